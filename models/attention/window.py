"""window: sliding-window softmax attention (Longformer/Mistral style). Causal: each query
sees the w keys before it and itself; bidirectional: w on each side. Whole tiles outside
the window are skipped, so the cost is O(T * w). Every position scheme composes with it: the
window's band and RoPE or ALiBi are fused alike (models/softmax.py)."""

import dataclasses

import torch

from attnbench.models import peers, positions
from attnbench.models.fla import fla_missing
from attnbench.models.pair_flops import softmax_flops
from attnbench.models.qkv import qkv_layer
from attnbench.models.registry import Impl, LayerConfig, Mechanism, Varlen
from attnbench.models.softmax import softmax_impls, softmax_options
from attnbench.models.softmax_decode import softmax_decode

DEFAULT_WINDOW = 1024


def sliding_options(cfg: LayerConfig) -> dict:
    if cfg.window is None:
        cfg = dataclasses.replace(cfg, window=DEFAULT_WINDOW)
    return softmax_options(cfg)


def fla_parallel(q, k, v, *, causal: bool, seq_lens=None, window=None, slopes=None, theta=None, offset=0) -> torch.Tensor:
    """flash-linear-attention's parallel_attn with its sliding window: q [B, T, Hq, D],
    k/v [B, T, Hkv, D] -> [B, T, Hq, D]. fla's window_size counts the query's own key, W
    (LayerConfig.window, models/registry.py) does not: window (W, 0) is window_size W + 1.
    RoPE rotates q and k in torch first."""
    from fla.ops.attn import parallel_attn

    if seq_lens is not None:
        raise ValueError("fla's parallel_attn takes no key padding")
    if theta is not None:
        q, k = positions.rotate_qk(q, k, theta, offset)
    return parallel_attn(q, k, v, window_size=_fla_window_size(causal, window, slopes))


def fla_parallel_varlen(cu_seqlens, max_seqlen, *, causal: bool, window=None, slopes=None, theta=None):
    """fla_parallel over a pack (registry.Varlen): parallel_attn's own varlen path, the pack as one
    sequence [1, total] with its cu_seqlens (int64, as fla takes them); RoPE rotates in torch first."""
    from fla.ops.attn import parallel_attn

    window_size = _fla_window_size(causal, window, slopes)
    offsets = cu_seqlens.long()

    def attend(q, k, v):
        q, k = peers.packed_rope(q, k, theta)
        return parallel_attn(q[None], k[None], v[None], window_size=window_size, cu_seqlens=offsets)[0]

    return attend


def _fla_window_size(causal: bool, window, slopes) -> int:
    """parallel_attn's window_size for our window (W, 0): W + 1 (module docstring)."""
    if not causal or window is None or window[1] != 0 or slopes is not None:
        raise ValueError("fla's parallel_attn takes a causal left window without ALiBi")
    return window[0] + 1


def _fla_unsupported(cfg: LayerConfig, device, dtype) -> str | None:
    if not cfg.causal:
        return "fla's parallel_attn is causal only"
    if cfg.positions == "alibi":
        return "fla's parallel_attn takes no ALiBi bias"
    if dtype not in (torch.float16, torch.bfloat16):
        return "fla's parallel_attn runs fp16 or bf16"
    return None


IMPLS = {
    **softmax_impls(needs_mask=True),
    "fla": Impl("fla", fla_parallel, "flash-linear-attention parallel_attn with window_size (Triton)",
                needs_cuda=True, missing=fla_missing("attn"), unsupported=_fla_unsupported, varlen=Varlen(fla_parallel_varlen)),
}

MECHANISM = Mechanism(
    name="window",
    windowed=True,
    description="sliding-window softmax attention (left window w causal, w each side bidirectional)",
    family="sparse",
    layer=qkv_layer(sliding_options, IMPLS),
    impls=IMPLS,
    flops=softmax_flops,
    params={"window": (DEFAULT_WINDOW, "keys before the query (and after it, bidirectional), plus the query; --window sets it")},
    decode=softmax_decode(sliding_options),
)
