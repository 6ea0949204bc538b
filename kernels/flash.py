"""Triton flash attention for the exact-softmax family: standard, causal, key padding,
GQA/MQA, sliding windows, ALiBi and RoPE in one skeleton (forward: kernels/flash_fwd.py,
backward: kernels/flash_bwd.py, shared tiles: kernels/flash_tiles.py, launching:
kernels/flash_launch.py, RoPE's rotation passes: kernels/flash_rope.py); the same kernels
visit listed blocks only for kernels/block_sparse.py.
"""

from __future__ import annotations

import functools

import torch
import triton

from attnbench.kernels.flash_bwd import flash_backward
from attnbench.kernels.flash_fwd import flash_forward
from attnbench.kernels.flash_launch import NO_LIMIT, FlashProblem, empty
from attnbench.kernels.flash_rope import rope
from attnbench.kernels.flash_tiles import INTERPRET
from attnbench.kernels.reference import rope_angles

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


class FlashAttention(torch.autograd.Function):
    """Differentiable flash attention over (q, k, v), or over the fused projection
    (qkv [B, T, Hq + 2 Hkv, D],) with ``split`` = (Hq, Hkv, Hkv): then the backward writes dq, dk,
    dv into one tensor, qkv's gradient, where autograd would concatenate three after a split.
    With RoPE, q and k are rotated before the forward (kernels/flash_rope.py) and the backward
    kernels rotate dq and dk back; the rotated q and k are what is saved."""

    @staticmethod
    def forward(ctx, problem: FlashProblem, split: tuple[int, int, int] | None, *inputs):
        q, k, v = inputs if split is None else inputs[0].split(split, dim=2)
        if problem.rope and split is None:
            q, k = rope(q, problem, k.shape[1] - q.shape[1]), rope(k, problem, 0)
        elif problem.rope:  # q's and k's heads side by side, rotated in one pass (T = S: no shift)
            q, k = rope(inputs[0][:, :, : split[0] + split[1]], problem, 0).split(split[:2], dim=2)
        o, lse = flash_forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.problem, ctx.split = problem, split
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if ctx.split is None:
            return None, None, *flash_backward(q, k, v, o, lse, do, ctx.problem)
        b, t, _, d = q.shape
        packed = empty((b, t, sum(ctx.split), d), q.dtype, q.device)
        flash_backward(q, k, v, o, lse, do, ctx.problem, grads=packed.split(ctx.split, dim=2))
        return None, None, packed


@functools.lru_cache(maxsize=16)
def _rope_tables(length: int, head_dim: int, theta: float, offset: int, device: torch.device):
    """cos, sin float32 [length, D/2] at positions offset .. offset+length-1, cached (a model's
    layers share them; the rotation pass and the backward kernels read them by position)."""
    positions = torch.arange(offset, offset + length, device=device)
    cos, sin = rope_angles(positions, head_dim, theta)
    return cos.contiguous(), sin.contiguous()


def check_inputs(q, k, v, seq_lens, window, slopes, theta, scale) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, T, Hq, D] and k, v [B, S, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (b, _, hq, d), (bk, _, hkv, dk) = q.shape, k.shape
    if b != bk or d != dk or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch or head_dim, or Hq is not a multiple of Hkv")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} > {_MAX_HEAD_DIM} is not supported")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    if seq_lens is not None and tuple(seq_lens.shape) != (b,):
        raise ValueError(f"seq_lens must have shape [B] = [{b}], got {tuple(seq_lens.shape)}")
    if window is not None and min(window) < 0:
        raise ValueError(f"window bounds must be >= 0, got {window}")
    if slopes is not None and tuple(slopes.shape) != (hq,):
        raise ValueError(f"ALiBi slopes must have shape [Hq] = [{hq}], got {tuple(slopes.shape)}")
    if theta is not None and d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    if scale is not None and not scale > 0:  # the forward takes each row's max of the unscaled scores
        raise ValueError(f"the softmax scale must be > 0, got {scale}")


def flash_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    offset: int = 0,
    scale: float | None = None,
) -> FlashProblem:
    """What the kernels need beyond q [B, T, Hq, D] and k [B, S, Hkv, D] (options: flash_attention).
    Without tensor options the problem is cached, so a model's repeated calls (the same shapes
    every layer and step) build it, and its launch arguments, once."""
    t, s, d = q.shape[1], k.shape[1], q.shape[3]
    window = None if window is None else tuple(window)
    if seq_lens is None and slopes is None:
        return _cached_problem(t, s, d, q.dtype, q.device, causal, window, theta, offset, scale)
    return _build_problem(t, s, d, q.dtype, q.device, causal, seq_lens, window, slopes, theta, offset, scale)


@functools.lru_cache(maxsize=64)
def _cached_problem(t, s, d, dtype, device, causal, window, theta, offset, scale) -> FlashProblem:
    return _build_problem(t, s, d, dtype, device, causal, None, window, None, theta, offset, scale)


def _build_problem(t, s, d, dtype, device, causal, seq_lens, window, slopes, theta, offset, scale) -> FlashProblem:
    left, right = window if window is not None else (NO_LIMIT, NO_LIMIT)
    if causal:
        right = 0 if window is None else min(right, 0)
    cos = sin = None
    if theta is not None:  # row p of the tables is position offset + p; with T > S the first
        # queries sit at negative p, so the tables start that many rows earlier in memory
        first = min(0, s - t)
        cos, sin = (x[-first:] for x in _rope_tables(s - first, d, float(theta), int(offset) + first, device))
    return FlashProblem(
        causal=causal,
        left=int(left),
        right=int(right),
        seq_lens=None if seq_lens is None else seq_lens.to(device=device, dtype=torch.int32).contiguous(),
        slopes=None if slopes is None else slopes.to(device=device, dtype=torch.float32).contiguous(),
        cos=cos,
        sin=sin,
        scale=d**-0.5 if scale is None else float(scale),
        head_dim=d,
        dtype=dtype,
        seq_bucket=triton.next_power_of_2(max(t, s, 1024)),
    )


def flash_attention(
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
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention, differentiable in q, k and v: o [B, T, Hq, D] in q's dtype.

    q [B, T, Hq, D], k/v [B, S, Hkv, D], any strides, fp16/bf16/fp32, D <= 256 (any size;
    tiles are padded to a power of two); Hq a multiple of Hkv (GQA/MQA).
    causal: query i sits at position i + S - T (aligned bottom-right) and sees keys j <= it.
    seq_lens int [B]: keys j >= seq_lens[b] are padding. A query with no visible key gets 0.
    window (left, right): keys within [pos - left, pos + right] (with causal, right is 0).
    slopes float32 [Hq]: ALiBi bias -slope * |pos_q - pos_k|.
    theta: RoPE base (rotate-half; one Triton pass rotates q and k, the backward rotates dq, dk back);
        queries at offset + S - T + i, keys at offset + j.
    scale: of q.k, > 0 (default D^-0.5).
    """
    check_inputs(q, k, v, seq_lens, window, slopes, theta, scale)
    problem = flash_problem(
        q, k, causal=causal, seq_lens=seq_lens, window=window, slopes=slopes, theta=theta, offset=offset, scale=scale
    )
    return FlashAttention.apply(problem, None, q, k, v)


def flash_attention_packed(qkv: torch.Tensor, heads: int, **options) -> torch.Tensor:
    """flash_attention over the fused projection qkv [B, T, Hq + 2 Hkv, D] (q heads first, then
    k's, then v's; Hq = ``heads``): o [B, T, Hq, D]. Its gradient is one tensor, written in place
    by the backward kernels, so a layer saves the concatenation a split's backward would run."""
    kv_heads, odd = divmod(qkv.shape[2] - heads, 2) if qkv.dim() == 4 else (0, 1)
    if odd or kv_heads < 1:
        raise ValueError(f"expected qkv [B, T, Hq + 2 Hkv, D] with Hq = {heads}; got {tuple(qkv.shape)}")
    split = (heads, kv_heads, kv_heads)
    q, k, v = qkv.split(split, dim=2)
    check_inputs(q, k, v, options.get("seq_lens"), options.get("window"), options.get("slopes"), options.get("theta"), options.get("scale"))
    return FlashAttention.apply(flash_problem(q, k, **options), split, qkv)
