"""Adapters to the best existing softmax-attention implementations: PyTorch SDPA's
backends and FlexAttention.

Both take the kernel-level layout q [B, T, Hq, D], k/v [B, S, Hkv, D] and the softmax
family's options (window, ALiBi slopes, RoPE theta/offset) and return o [B, T, Hq, D].
What they cannot fuse is done the way a user would without our kernels: RoPE rotates
q and k in torch first; ALiBi and windows become a mask or bias tensor for SDPA and a
score_mod / block mask for flex.

Over a packed variable-length batch (registry.Varlen: q [total, Hq, D], k/v [total, Hkv, D],
cu_seqlens int32 [N + 1]): ``sdpa_varlen`` runs SDPA on jagged nested tensors, ``flex_varlen``
FlexAttention over the pack as one sequence with a document mask.
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


def _sequence_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The sequence each token of a pack belongs to: int64 [total], from cu_seqlens [N + 1]."""
    lengths = cu_seqlens.diff()
    return torch.arange(lengths.numel(), device=cu_seqlens.device).repeat_interleave(lengths)


def packed_rope(q: torch.Tensor, k: torch.Tensor, theta: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE over a pack, q [total, Hq, D] and k [total, Hkv, D], rotated as one sequence: RoPE's
    scores (and their gradients) depend on the distance between query and key alone, which inside
    one sequence is the same in the pack, so each sequence attends as if at positions 0 .. L - 1."""
    q, k = _rotate_if_rope(q[None], k[None], theta, 0)
    return q[0], k[0]


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


def sdpa_varlen(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    backend: "torch.nn.attention.SDPBackend | None" = None,
):
    """F.scaled_dot_product_attention over a pack as jagged nested tensors (torch.nested,
    layout=torch.jagged, [N, j, H, D] views of q [total, Hq, D], k/v [total, H, D]): bind
    (registry.Varlen) -> attend(q, k, v) -> o [total, Hq, D], optionally pinned to one backend.
    torch 2.13 takes no mask with nested tensors, so no window nor ALiBi; no GQA; causal only on
    the fused CUDA backends (models/softmax.py says why not, case by case). RoPE rotates in torch."""
    if window is not None or slopes is not None:
        raise ValueError("SDPA takes no mask on jagged nested tensors: no window, no ALiBi")
    offsets = cu_seqlens.long()
    lengths = cu_seqlens.diff()
    seqlens = {"min_seqlen": int(lengths.min()), "max_seqlen": max_seqlen}  # given: no device sync in each call

    def attend(q, k, v):
        q, k = packed_rope(q, k, theta)
        # contiguous: the math backend refuses views of a fused projection (a layer's q, k, v)
        q, k, v = (torch.nested.nested_tensor_from_jagged(x.contiguous(), offsets, **seqlens).transpose(1, 2) for x in (q, k, v))
        with torch.nn.attention.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return o.transpose(1, 2).values()

    return attend


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
        keep = _band(q_idx + shift, kv_idx, causal, window)
        if seq_lens is not None:
            keep = keep & (kv_idx < seq_lens[batch])
        return keep

    return create_block_mask(mask_mod, b if seq_lens is not None else None, None, t, s, device=device)


def _band(pos_q, kv_idx, causal: bool, window: tuple[int, int] | None):
    """A flex mask_mod's causal and window terms: which keys the query at ``pos_q`` sees."""
    keep = kv_idx >= 0
    if causal:
        keep = keep & (kv_idx <= pos_q)
    if window is not None:
        keep = keep & (kv_idx >= pos_q - window[0]) & (kv_idx <= pos_q + window[1])
    return keep


def _alibi_score_mod(slopes: torch.Tensor | None, shift: int):
    """ALiBi as a flex score_mod, queries ``shift`` positions after their index (None: no bias)."""
    if slopes is None:
        return None
    slopes_f = slopes.float()

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score - slopes_f[head] * (q_idx + shift - kv_idx).abs()

    return score_mod


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
    fn = compiled_flex() if compiled else flex_attention
    o = fn(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        score_mod=_alibi_score_mod(slopes, s - t),
        block_mask=block_mask,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)


def flex_varlen(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    compiled: bool = True,
):
    """FlexAttention over a pack as one sequence [1, total]: bind (registry.Varlen) -> attend(q, k, v)
    -> o [total, Hq, D]. A document mask keeps each query to its own sequence (and to its causal
    part and window there); ALiBi is a score_mod. Inside one sequence a distance in the pack is the
    distance in the sequence, so both work on pack indices. The block mask is built here, once a
    pack: its build is not timed (the sweep records it as setup_ms). RoPE rotates in torch."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    ids = _sequence_ids(cu_seqlens)
    total = ids.numel()

    def document_mask(batch, head, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & _band(q_idx, kv_idx, causal, window)

    block_mask = create_block_mask(document_mask, None, None, total, total, device=cu_seqlens.device)
    score_mod = _alibi_score_mod(slopes, 0)
    fn = compiled_flex() if compiled else flex_attention

    def attend(q, k, v):
        q, k = packed_rope(q, k, theta)
        o = fn(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
               score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(1, 2)[0]

    return attend
