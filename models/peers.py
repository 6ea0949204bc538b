"""Adapters to the best existing softmax-attention implementations: PyTorch SDPA's
backends and FlexAttention.

Both take the kernel-level layout q [B, T, Hq, D], k/v [B, S, Hkv, D] and the softmax
family's options (window, ALiBi slopes, RoPE theta/offset) and return o [B, T, Hq, D].
What they cannot fuse is done the way a user would without our kernels: RoPE rotates
q and k in torch first; ALiBi and windows become a mask or bias tensor for SDPA and a
score_mod / block mask for flex.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from attnbench.kernels import reference
from attnbench.models import positions


def _rotate_if_rope(q, k, theta: float | None, offset: int):
    return (q, k) if theta is None else positions.rotate_qk(q, k, theta, offset)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    offset: int = 0,
    backend: "torch.nn.attention.SDPBackend | None" = None,
) -> torch.Tensor:
    """F.scaled_dot_product_attention on [B, T, H, D] tensors, optionally pinned to one backend."""
    q, k = _rotate_if_rope(q, k, theta, offset)
    t, s = q.shape[1], k.shape[1]
    mask = None
    is_causal = causal
    if seq_lens is not None or window is not None or slopes is not None or (causal and t != s):
        visible = reference.visible(t, s, causal=causal, window=window, seq_lens=seq_lens, device=q.device)
        mask = visible  # (B|1, 1, T, S) bool
        if slopes is not None:
            pos_k = torch.arange(s, device=q.device)
            bias = positions.alibi_bias(slopes, pos_k[s - t :], pos_k, q.dtype)[None]  # (1, H, T, S)
            mask = bias.masked_fill(~visible, float("-inf"))
        is_causal = False
    pinned = torch.nn.attention.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with pinned:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=q.shape[2] != k.shape[2],
        )
    return o.transpose(1, 2)


@functools.lru_cache(maxsize=1)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # one compile per shape (dynamic=False, the fastest kernels); a sweep has more shapes than
    # dynamo's default recompile limit of 8, past which flex silently runs unfused
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _block_mask(b, t, s, causal, window, seq_lens_key, device):
    from torch.nn.attention.flex_attention import create_block_mask

    seq_lens = None if seq_lens_key is None else torch.tensor(seq_lens_key, device=device)
    shift = s - t

    def mask_mod(batch, head, q_idx, kv_idx):
        pos_q = q_idx + shift
        keep = kv_idx >= 0
        if causal:
            keep = keep & (kv_idx <= pos_q)
        if window is not None:
            keep = keep & (kv_idx >= pos_q - window[0]) & (kv_idx <= pos_q + window[1])
        if seq_lens is not None:
            keep = keep & (kv_idx < seq_lens[batch])
        return keep

    return create_block_mask(mask_mod, b if seq_lens is not None else None, None, t, s, device=device)


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    offset: int = 0,
    compiled: bool = True,
) -> torch.Tensor:
    """FlexAttention on [B, T, H, D] tensors: block mask for causal/window/padding, score_mod for ALiBi.

    The block mask is cached per shape and mask (building it is setup, not attention).
    """
    from torch.nn.attention.flex_attention import flex_attention

    q, k = _rotate_if_rope(q, k, theta, offset)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    key = None if seq_lens is None else tuple(seq_lens.tolist())
    block_mask = None
    if causal or window is not None or seq_lens is not None:
        block_mask = _block_mask(b, t, s, causal, window, key, str(q.device))
    score_mod = None
    if slopes is not None:
        shift = s - t
        slopes_f = slopes.float()

        def score_mod(score, batch, head, q_idx, kv_idx):
            return score - slopes_f[head] * (q_idx + shift - kv_idx).abs()

    fn = compiled_flex() if compiled else flex_attention
    o = fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        score_mod=score_mod,
        block_mask=block_mask,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)
