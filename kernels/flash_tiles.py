"""Tile helpers shared by the flash-attention forward and backward kernels.

Conventions (kernels/flash_fwd.py, kernels/flash_bwd.py):
- Positions: query row i sits at position i + S - T (the last query aligned with the last
  key), key row j at j. Key j is visible to a query at position p when
  p - left <= j <= p + right and j < kv_len (causal is right = 0; "no window" is a huge left).
- q and k tiles come in two column parts (a, b) so RoPE can rotate them in registers:
  with ROPE, a = x[:, :D/2] and b = x[:, D/2:] after the rotate-half rotation, and a score is
  dot(q_a, k_a^T) + dot(q_b, k_b^T); without ROPE, a is the whole row (padded to PART
  columns) and b is unused.
- Scores live in the log2 domain (scale * log2(e) folded in) so softmax uses exp2.
- Tiles a loop walks over (k, v in the forward and dq; q, dO in dk/dv) come from a tile
  source: with TMA a tensor descriptor, so Hopper's copy engine fetches each tile (no address
  registers, no per-thread copies), otherwise the base pointer (kernels/flash_launch.py,
  use_tma, says when).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# triton's CPU interpreter multiplies bf16 tiles as their uint16 bit patterns; upcasting
# first is exact (a product of two 16-bit floats fits float32) and what the GPU computes
_DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def load_rows(base, rows, n_rows, stride_row, cols, n_cols, stride_col):
    """x[rows, cols] of a row-major view with any strides; out-of-range elements read 0."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def store_rows(base, x, rows, n_rows, stride_row, cols, n_cols, stride_col):
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def rope_table(cos_ptr, sin_ptr, positions, rows, n_rows, HALF: tl.constexpr, PART: tl.constexpr):
    """cos, sin [rows, PART] float32 of the RoPE angles at ``positions`` (tables [S, HALF])."""
    cols = tl.arange(0, PART)
    offsets = positions[:, None] * HALF + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HALF)
    return tl.load(cos_ptr + offsets, mask=mask, other=0.0), tl.load(sin_ptr + offsets, mask=mask, other=0.0)


@triton.jit
def load_qk(
    base, rows, n_rows, stride_row, stride_col, cos_ptr, sin_ptr, positions,
    HEAD_DIM: tl.constexpr, PART: tl.constexpr, ROPE: tl.constexpr,
):
    """A q or k tile as its two parts (a, b), rotated in registers when ROPE (module docstring)."""
    cols = tl.arange(0, PART)
    if ROPE:
        half: tl.constexpr = HEAD_DIM // 2
        x1 = load_rows(base, rows, n_rows, stride_row, cols, half, stride_col)
        x2 = load_rows(base + half * stride_col, rows, n_rows, stride_row, cols, half, stride_col)
        cos, sin = rope_table(cos_ptr, sin_ptr, positions, rows, n_rows, half, PART)
        # rotate in float32 and round once, so q' and k' carry a single rounding error
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        a = (x1f * cos - x2f * sin).to(x1.dtype)
        b = (x2f * cos + x1f * sin).to(x1.dtype)
    else:
        a = load_rows(base, rows, n_rows, stride_row, cols, HEAD_DIM, stride_col)
        b = a
    return a, b


@triton.jit
def tile_source(base, n_rows, stride_row, N_COLS: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr):
    """Where [BLOCK, COLS] row tiles of a row-major view [n_rows, N_COLS] are read from: a TMA
    descriptor (unit column stride, 16-byte-aligned base and row stride) or ``base`` itself."""
    if TMA:
        source = tl.make_tensor_descriptor(base, shape=[n_rows, N_COLS], strides=[stride_row, 1], block_shape=[BLOCK, COLS])
    else:
        source = base
    return source


@triton.jit
def read_rows(source, start, n_rows, stride_row, stride_col, N_COLS: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + BLOCK) x columns [0, COLS) from a tile_source; out of range reads 0."""
    if TMA:
        x = source.load([start, 0])
    else:
        x = load_rows(source, start + tl.arange(0, BLOCK), n_rows, stride_row, tl.arange(0, COLS), N_COLS, stride_col)
    return x


@triton.jit
def read_qk(
    source, start, n_rows, stride_row, stride_col, cos_ptr, sin_ptr, shift,
    HEAD_DIM: tl.constexpr, PART: tl.constexpr, ROPE: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr,
):
    """load_qk of rows [start, start + BLOCK) (at positions row + shift) from a tile_source;
    TMA never comes with ROPE (the rotation needs the two halves apart)."""
    if TMA:
        a = source.load([start, 0])
        b = a
    else:
        rows = start + tl.arange(0, BLOCK)
        a, b = load_qk(source, rows, n_rows, stride_row, stride_col, cos_ptr, sin_ptr, rows + shift, HEAD_DIM, PART, ROPE)
    return a, b


@triton.jit
def store_qk_grad(
    base, grad_a, grad_b, rows, n_rows, stride_row, stride_col, cos_ptr, sin_ptr, positions,
    HEAD_DIM: tl.constexpr, PART: tl.constexpr, ROPE: tl.constexpr,
):
    """Store the gradient of a q or k tile given the gradient of its parts (a, b);
    with ROPE the parts are gradients w.r.t. the rotated tile, so apply the inverse rotation."""
    cols = tl.arange(0, PART)
    if ROPE:
        half: tl.constexpr = HEAD_DIM // 2
        cos, sin = rope_table(cos_ptr, sin_ptr, positions, rows, n_rows, half, PART)
        grad1 = grad_a * cos + grad_b * sin
        grad2 = grad_b * cos - grad_a * sin
        store_rows(base, grad1, rows, n_rows, stride_row, cols, half, stride_col)
        store_rows(base + half * stride_col, grad2, rows, n_rows, stride_row, cols, half, stride_col)
    else:
        store_rows(base, grad_a, rows, n_rows, stride_row, cols, HEAD_DIM, stride_col)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in float32 (acc None: a @ b)."""
    if _DOT_IN_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def qk_dot(x_a, x_b, y_a, y_b, ROPE: tl.constexpr, PRECISION: tl.constexpr):
    """x @ y^T of two tiles given as parts (module docstring): [M, N] float32."""
    s = mma(x_a, tl.trans(y_a), None, PRECISION)
    if ROPE:
        s = mma(x_b, tl.trans(y_b), s, PRECISION)
    return s


@triton.jit
def score_tile(
    s, pos_q, pos_k, kv_len, left, right, scale_log2, slope_log2,
    ALIBI: tl.constexpr, MASKED: tl.constexpr,
):
    """Raw q.k^T scores -> log2-domain logits with the ALiBi bias, -inf where not visible.

    pos_q and pos_k broadcast against s ([M, 1] and [1, N], or transposed)."""
    s = s * scale_log2
    if ALIBI:
        s -= slope_log2 * tl.abs(pos_q - pos_k).to(tl.float32)
    if MASKED:
        visible = (pos_k >= pos_q - left) & (pos_k <= pos_q + right) & (pos_k < kv_len)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def query_program(SEQ_LENS, SLOPES, S, HQ, GROUP, CAUSAL: tl.constexpr, HAS_SEQ_LENS: tl.constexpr, ALIBI: tl.constexpr):
    """Who a program of grid (query blocks, B * Hq) is: (query block, b * Hq + h, b, q head h,
    kv head, visible keys kv_len, ALiBi slope in log2 units). Causal: longest rows first, so the
    short ones fill the tail of the schedule."""
    block = tl.program_id(0)
    if CAUSAL:
        block = tl.num_programs(0) - 1 - block
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kv_len = tl.load(SEQ_LENS + b) if HAS_SEQ_LENS else S
    kv_len = tl.minimum(kv_len, S)
    slope_log2 = tl.load(SLOPES + h) * 1.4426950408889634 if ALIBI else 0.0
    return block, bh, b, h, h // GROUP, kv_len, slope_log2


@triton.jit
def key_blocks(q_start, T, S, kv_len, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of the query block [q_start, q_start + BLOCK_M), split for masking.

    Returns lo <= full_lo <= full_hi <= hi: blocks in [lo, full_lo) and [full_hi, hi) need the
    visibility mask, blocks in [full_lo, full_hi) are visible to every row (no mask), and
    nothing outside [lo, hi) is visible, so whole tiles outside a window are never loaded."""
    p0 = q_start + S - T
    p1 = p0 + BLOCK_M - 1
    hi = tl.maximum(tl.minimum(kv_len, p1 + right + 1), 0)
    lo = tl.minimum(tl.maximum(p0 - left, 0) // BLOCK_N * BLOCK_N, hi)
    full_lo = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(p1 - left, 0), BLOCK_N) * BLOCK_N), hi)
    full_hi = tl.maximum(tl.minimum(kv_len, p0 + right + 1), 0) // BLOCK_N * BLOCK_N
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_blocks(k_start, T, S, kv_len, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range that sees some key of the key block [k_start, k_start + BLOCK_N), split
    like key_blocks: [lo, full_lo) and [full_hi, hi) masked, [full_lo, full_hi) unmasked."""
    shift = S - T
    k_last = k_start + BLOCK_N - 1
    hi = tl.minimum(tl.maximum(k_last + left - shift + 1, 0), T)
    hi = tl.where(k_start < kv_len, hi, 0)  # a block of padding keys gets no gradient
    lo = tl.minimum(tl.minimum(tl.maximum(k_start - right - shift, 0), T) // BLOCK_M * BLOCK_M, hi)
    full_lo = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(k_last - right - shift, 0), BLOCK_M) * BLOCK_M), hi)
    full_lo = tl.where(k_last < kv_len, full_lo, hi)  # part padding: every query block is masked
    full_hi = tl.maximum(k_start + left - shift + 1, 0) // BLOCK_M * BLOCK_M
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi
