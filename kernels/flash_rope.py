"""RoPE for the flash kernels, outside their loops: q and k are rotated once, in one pass, before
the forward (rope_kernel), and the backward kernels rotate their float32 dq and dk back in their
epilogues (unrotate_rows), once per row. (Rotating inside the loops redid each streamed tile's
rotation for every query or key block that read it: O(T^2 / block) rotations where this does O(T).)

Rotate-half convention; the angles come from cos/sin tables [S, D/2] float32 by position
(kernels/flash.py builds them); each rotation runs in float32 and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnbench.kernels.flash_launch import FlashProblem, blocks, empty, flash_autotune, tile_config
from attnbench.kernels.flash_tiles import load_rows, row_offset, sequence, store_rows


@flash_autotune(
    {64: [tile_config(64, 0, 4, 1)], 128: [tile_config(32, 0, 4, 1)], 256: [tile_config(16, 0, 4, 1)]},
    fp32=tile_config(16, 0, 4, 1),
    interpret=tile_config(16, 0, 4, 1),
)
@triton.jit
def rope_kernel(
    X, Y, COS, SIN, CU_SEQLENS,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    T, H, shift, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), B * H): y [B, T, H, D] = x [B, T, H, D] rotated by the angles at
    positions t + shift (SEQ_BUCKET and PRECISION choose the tile, flash_launch.flash_autotune).
    VARLEN: x is a pack (B = 1) of the sequences CU_SEQLENS bounds, grid (cdiv(longest, BLOCK_M),
    N * H), positions counted from each sequence's first row (flash_tiles.sequence)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    b, first, T, _ = sequence(CU_SEQLENS, b, T, T, VARLEN)
    half: tl.constexpr = HEAD_DIM // 2
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD // 2)
    X += row_offset(b, first, stride_xb, stride_xt) + h * stride_xh
    Y += row_offset(b, first, stride_yb, stride_yt) + h * stride_yh
    x1 = load_rows(X, rows, T, stride_xt, cols, half, stride_xd).to(tl.float32)
    x2 = load_rows(X + half * stride_xd, rows, T, stride_xt, cols, half, stride_xd).to(tl.float32)
    cos, sin = _cos_sin(COS, SIN, rows + shift, cols, (rows[:, None] < T) & (cols[None, :] < half), half)
    store_rows(Y, x1 * cos - x2 * sin, rows, T, stride_yt, cols, half, stride_yd)
    store_rows(Y + half * stride_yd, x2 * cos + x1 * sin, rows, T, stride_yt, cols, half, stride_yd)


@triton.jit
def _cos_sin(COS, SIN, positions, pairs, visible, HALF: tl.constexpr):
    """cos, sin [rows, cols] float32 of pair ``pairs[col]``'s angle at ``positions[row]``, from the
    tables [*, HALF]; 0 where not ``visible``."""
    angles = positions[:, None] * HALF + pairs[None, :]
    return tl.load(COS + angles, mask=visible, other=0.0), tl.load(SIN + angles, mask=visible, other=0.0)


@triton.jit
def unrotate_rows(x, rows, n_rows, positions, COS, SIN, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """R^T x for x [rows, D_PAD] float32, the gradient with respect to rows that RoPE rotated at
    ``positions``: the gradient with respect to the rows before the rotation. Column j pairs with
    j + D/2 (or j - D/2); padding columns stay 0."""
    half: tl.constexpr = HEAD_DIM // 2
    cols = tl.arange(0, D_PAD)
    first = cols < half
    pair = tl.where(first, cols, cols - half)
    partner = tl.where(cols < HEAD_DIM, tl.where(first, cols + half, cols - half), cols)
    cos, sin = _cos_sin(COS, SIN, positions, pair, (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), half)
    # first half: g1 = a cos + b sin; second half: g2 = b cos - a sin
    x_partner = tl.gather(x, tl.broadcast_to(partner[None, :], x.shape), 1)
    return x * cos + x_partner * tl.where(first[None, :], sin, -sin)


def rope(x: torch.Tensor, problem: FlashProblem, shift: int) -> torch.Tensor:
    """x [B, T, H, D] (any strides) rotated by the problem's RoPE angles at positions t + shift
    (packed problems: B = 1, positions restart at 0 in each sequence, shift 0): a new contiguous
    tensor of x's dtype."""
    b, t, h, _ = x.shape
    out = empty(x.shape, x.dtype, x.device)
    rows, sequences = problem.programs(b, t)
    rope_kernel[lambda m: (blocks(rows, m["BLOCK_M"]), sequences * h)](
        x, out, problem.cos, problem.sin, problem.pack_offsets(x), *x.stride(), *out.stride(), t, h, shift, **problem.rotation_kwargs,
    )
    return out
