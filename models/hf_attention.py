"""Our attention cores inside any transformers model, through its AttentionInterface.

    name = register("standard", impl="triton")           # -> "attnbench-standard"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)

transformers calls the registered function once per attention layer, after its own
projections (and its own RoPE, where the model has one):

    fn(module, query [B, Hq, T, D], key/value [B, Hkv, S, D], attention_mask, *,
       dropout, scaling, is_causal=None, **kwargs) -> (out [B, T, Hq, D], None)

We transpose to the kernel-level layout q [B, T, Hq, D], k/v [B, S, Hkv, D] (views, no
copy) and run the registry's core. The mask is HF's boolean 4D mask [B, 1, T, S] (True =
attend; we register transformers' sdpa mask builder for our names, else HF would build
none), or None when plain causal/bidirectional attention needs none; our kernels take
causal + key-padding lengths, so a mask is translated to those and checked to be exactly
that pattern (left padding, packed sequences or sliding windows are refused, not
silently approximated).

Any mechanism with a kernel-level core (``has_core``) can be registered; each HF attention
module gets its own core layer, created on the first forward, attached as the submodule
``attnbench_core`` (so a mechanism's learnable core parameters, e.g. ExpoSB's, train and
save with the model). For the softmax family (standard, rope, alibi, window) the core has
no parameters and "attnbench-standard" computes exactly what HF's eager attention does.
"""

from __future__ import annotations

import functools

import torch

from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.registry import LayerConfig

PREFIX = "attnbench-"
CORE_ATTRIBUTE = "attnbench_core"


def implementation_name(mechanism: str) -> str:
    """The attn_implementation name of ``mechanism``: "attnbench-<mechanism>"."""
    return f"{PREFIX}{mechanism}"


def register(mechanism: str, impl: str = "torch") -> str:
    """Register ``mechanism`` (run by ``impl``) with transformers; returns its attn_implementation name.

    Registering the same mechanism again rebinds the name to the new impl.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    entry = registry.get(mechanism)
    entry.impl(impl)  # unknown impl: UnknownNameError with the valid ones
    if not entry.has_core:
        raise registry.UnknownNameError(
            f"{mechanism} has no kernel-level core to run inside a transformers model; "
            f"valid: {', '.join(name for name, m in registry.mechanisms().items() if m.has_core)}"
        )
    name = implementation_name(mechanism)
    AttentionInterface.register(name, functools.partial(attention_forward, mechanism=mechanism, impl=impl))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    mechanism: str,
    impl: str,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: query [B, Hq, T, D], key/value [B, Hkv, S, D] -> ([B, T, Hq, D], None)."""
    if dropout:
        raise ValueError("attnbench cores have no attention dropout: run the model in eval mode or set it to 0")
    if kwargs.get("softcap") is not None:
        raise ValueError("attnbench cores do not support attention logit softcapping")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, T, H, D] views
    head_dim = q.shape[-1]
    if scaling is not None and scaling != head_dim**-0.5:
        q = q * (scaling * head_dim**0.5)  # our cores scale by D^-0.5; fold the model's own scale into q
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    seq_lens = key_padding_lengths(attention_mask, causal, q.shape[1], k.shape[1])
    core = _core(module, mechanism, impl, q, k, causal)
    return core.attend(q, k, v, seq_lens), None


def key_padding_lengths(mask: torch.Tensor | None, causal: bool, t: int, s: int) -> torch.Tensor | None:
    """Valid keys per sequence, LongTensor [B], from HF's boolean mask [B|1, 1, T, S], or None
    when every key is valid. Raises ValueError when the mask is not exactly causal/full
    attention with right padding (the only patterns our kernels take)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (t, s):
        raise ValueError(f"attnbench cores need a boolean [B, 1, {t}, {s}] mask, got {mask.dtype} {tuple(mask.shape)}")
    # the last query sees every valid key under both causal and full attention
    seq_lens = mask[:, 0, -1, :].sum(-1)
    expected = reference.visible(t, s, causal=causal, seq_lens=seq_lens, device=mask.device)
    if not torch.equal(*torch.broadcast_tensors(mask, expected)):
        kind = "causal" if causal else "bidirectional"
        raise ValueError(
            f"attnbench cores take {kind} attention with right padding only; this mask is another "
            "pattern (left padding, packed sequences, a sliding window?)"
        )
    return None if bool((seq_lens == s).all()) else seq_lens


def _core(module: torch.nn.Module, mechanism: str, impl: str, q: torch.Tensor, k: torch.Tensor, causal: bool):
    """The module's core layer, created on first use for these head counts, on q's device."""
    core = getattr(module, CORE_ATTRIBUTE, None)
    key = (mechanism, impl, q.shape[2], k.shape[2], q.shape[3], causal)
    if core is not None and core.attnbench_key == key:
        return core
    heads, kv_heads, head_dim = key[2], key[3], key[4]
    cfg = LayerConfig(dim=heads * head_dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, causal=causal, impl=impl)
    core = registry.build_layer(mechanism, cfg).to(q.device)
    # HF's own projections feed the core: the layer's would be dead weight
    core.qkv = core.out = None
    core.attnbench_key = key
    setattr(module, CORE_ATTRIBUTE, core)
    return core
