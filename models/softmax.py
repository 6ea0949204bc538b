"""The exact-softmax family: one set of impls shared by standard, rope, alibi and
window (and one layer module, models/qkv.py), which differ only in the options they pass.

Softmax-family kernel options (all impls take all of them):
    window (left, right) | None, slopes [Hq] float32 | None (ALiBi),
    theta float | None (RoPE base; None = no RoPE), offset int (RoPE position offset).
Any position scheme of the layer (LayerConfig.positions, or the mechanism's natural one)
becomes these options (`position_options`), so every impl serves every window x scheme x GQA cell
it can; one that cannot says so from the cfg (`Impl.unsupported`).

Over a packed variable-length batch (`Impl.varlen`, registry.Varlen; `speed --lengths`): torch
(the definition, each sequence on its own), triton (our varlen flash kernel), every sdpa impl
(jagged nested tensors) and flex (a document mask); every scheme's positions restart at 0 in
each sequence.
"""

from __future__ import annotations

from typing import Callable

import torch

from attnbench.kernels import reference
from attnbench.models import peers, positions
from attnbench.models.registry import Impl, LayerConfig, Varlen, missing_module

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def torch_reference(q, k, v, *, causal=False, seq_lens=None, window=None, slopes=None, theta=None, offset=0):
    """Plain torch by definition (kernels/reference.py): RoPE, then masked softmax attention."""
    if theta is not None:
        q, k = positions.rotate_qk(q, k, theta, offset)
    return reference.attention(q, k, v, causal=causal, seq_lens=seq_lens, window=window, slopes=slopes)


def torch_varlen(cu_seqlens, max_seqlen, *, causal=False, window=None, slopes=None, theta=None):
    """The definition over a pack (registry.Varlen): each sequence attended on its own by
    torch_reference, q [total, Hq, D], k/v [total, Hkv, D] -> o [total, Hq, D]."""
    bounds = cu_seqlens.tolist()  # once: the slices are the host's
    spans = list(zip(bounds, bounds[1:]))

    def attend(q, k, v):
        options = dict(causal=causal, window=window, slopes=slopes, theta=theta)
        return torch.cat([torch_reference(q[None, a:b], k[None, a:b], v[None, a:b], **options)[0] for a, b in spans])

    return attend


def triton_flash(q, k, v, **options):
    """Our Triton flash-attention kernel (kernels/flash.py)."""
    from attnbench.kernels.flash import flash_attention

    return flash_attention(q, k, v, **options)


def triton_flash_packed(qkv, heads, **options):
    """triton_flash over the fused projection qkv [B, T, Hq + 2 Hkv, D] (Impl.run_packed)."""
    from attnbench.kernels.flash import flash_attention_packed

    return flash_attention_packed(qkv, heads, **options)


def triton_flash_varlen(cu_seqlens, max_seqlen, *, causal=False, **options):
    """Our Triton flash kernel over a pack (kernels/flash.py flash_attention_varlen: window,
    ALiBi slopes and RoPE theta fused), registry.Varlen's bind."""
    from attnbench.kernels.flash import flash_attention_varlen

    return lambda q, k, v: flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, causal=causal, **options)


_triton_missing = missing_module("triton")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name)


def _needs_low_precision(cfg: LayerConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype in _LOW_PRECISION else f"needs fp16 or bf16, not {str(dtype).removeprefix('torch.')}"


def _flash_unsupported(needs_mask: bool, natural: str | None):
    def why(cfg: LayerConfig, device: torch.device, dtype: torch.dtype) -> str | None:
        if needs_mask or cfg.window is not None:
            return "the flash backend takes no mask (a window)"
        if (cfg.positions or natural) == "alibi":
            return "the flash backend takes no bias (ALiBi)"
        if cfg.head_dim > 256:
            return "the flash backend supports head_dim <= 256"
        return _needs_low_precision(cfg, device, dtype)

    return why


def _efficient_unsupported(cfg: LayerConfig, device: torch.device, dtype: torch.dtype) -> str | None:
    """torch 2.11's efficient backend has no kernel for enable_gqa (H200, `attnbench check`: 'No available kernel')."""
    return "the efficient backend takes no GQA (kv heads fewer than query heads)" if cfg.kv_heads != cfg.heads else None


def _nested_unsupported(needs_mask: bool, natural: str | None, math_only: bool):
    """Why SDPA cannot run a pack as jagged nested tensors (torch 2.13, torch/nested/_internal/sdpa.py);
    ``math_only``: the math backend is the one that runs (pinned, or on CPU, where it is the only one)."""

    def why(cfg: LayerConfig, device: torch.device, dtype: torch.dtype) -> str | None:
        if needs_mask or cfg.window is not None:
            return "SDPA takes no mask on jagged nested tensors ('Masks are not yet supported'): no window"
        if (cfg.positions or natural) == "alibi":
            return "SDPA takes no mask on jagged nested tensors ('Masks are not yet supported'): no ALiBi bias"
        if cfg.kv_heads != cfg.heads:
            return "SDPA on jagged nested tensors takes no GQA (no kernel trains broadcast kv heads)"
        if cfg.causal and (math_only or device.type != "cuda"):
            where = "" if math_only else " (on CPU it is the only backend for them)"
            return f"SDPA's math backend refuses is_causal on jagged nested tensors{where}"
        return None

    return why


def softmax_impls(needs_mask: bool = False, natural: str | None = None) -> dict[str, Impl]:
    """The impls of one softmax-family mechanism; ``needs_mask``: it always has a window, so
    SDPA needs a mask, which SDPA's flash backend cannot take (nor ALiBi's bias); ``natural``: the
    layer scheme of a cfg whose ``positions`` is None (the mechanism's own: rope, alibi)."""
    sdpa_backends = {
        "sdpa-flash": ("FLASH_ATTENTION", "SDPA, FlashAttention-2 backend", _flash_unsupported(needs_mask, natural)),
        "sdpa-cudnn": ("CUDNN_ATTENTION", "SDPA, cuDNN backend", _needs_low_precision),
        "sdpa-efficient": ("EFFICIENT_ATTENTION", "SDPA, memory-efficient (xformers) backend", _efficient_unsupported),
        "sdpa-math": ("MATH", "SDPA, math backend (materialises scores)", lambda *a: None),
    }
    impls = {
        "triton": Impl(
            "triton", triton_flash, "ours: fused Triton flash attention", triton_flash_packed, needs_cuda=True, missing=_triton_missing,
            varlen=Varlen(triton_flash_varlen),
        ),
        "torch": Impl("torch", torch_reference, "plain torch reference (T x T scores in memory)", varlen=Varlen(torch_varlen)),
        "sdpa": Impl("sdpa", peers.sdpa, "F.scaled_dot_product_attention, default dispatch",
                     varlen=Varlen(peers.sdpa_varlen, _nested_unsupported(needs_mask, natural, math_only=False))),
    }
    for name, (backend, description, unsupported) in sdpa_backends.items():
        run, varlen = _bind_backend(backend)
        no_padding = "the flash backend takes no mask (key padding)" if name == "sdpa-flash" else ""
        varlen = Varlen(varlen, _nested_unsupported(needs_mask, natural, math_only=name == "sdpa-math"))
        impls[name] = Impl(name, run, description, needs_cuda=name != "sdpa-math", unsupported=unsupported, no_padding=no_padding, varlen=varlen)
    impls["flex"] = Impl("flex", peers.flex, "FlexAttention, torch.compile'd", needs_cuda=True, varlen=Varlen(peers.flex_varlen))
    return impls


def _bind_backend(backend: str) -> tuple[Callable[..., torch.Tensor], Callable[..., Callable[..., torch.Tensor]]]:
    """peers.sdpa and peers.sdpa_varlen pinned to one SDPA ``backend``."""

    def run(q, k, v, **options):
        return peers.sdpa(q, k, v, backend=_sdpa_backend(backend), **options)

    def varlen(cu_seqlens, max_seqlen, **options):
        return peers.sdpa_varlen(cu_seqlens, max_seqlen, backend=_sdpa_backend(backend), **options)

    run.__name__ = f"sdpa_{backend.lower()}"
    varlen.__name__ = f"sdpa_{backend.lower()}_varlen"
    return run, varlen


def window_option(cfg: LayerConfig) -> dict:
    """The window bounds of ``cfg`` as a kernel option (empty when it has none)."""
    bounds = cfg.window_bounds
    return {} if bounds is None else {"window": bounds}


def position_options(cfg: LayerConfig, natural: str | None = None) -> dict:
    """The layer's position scheme (``cfg.positions``, else ``natural``) as softmax kernel
    options: RoPE's theta and offset, ALiBi's slopes, or nothing."""
    if (cfg.positions or natural) == "rope":
        return {"theta": positions.theta(cfg), "offset": 0}
    return positions.alibi_option(cfg, natural)


def softmax_options(cfg: LayerConfig, natural: str | None = None) -> dict:
    """The kernel options of a softmax-family layer: its window and its position scheme."""
    return {**position_options(cfg, natural), **window_option(cfg)}
