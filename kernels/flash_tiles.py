"""Tile helpers shared by the flash-attention forward and backward kernels.

Conventions (kernels/flash_fwd.py, kernels/flash_bwd.py):
- Positions: query row i sits at position i + S - T (the last query aligned with the last
  key), key row j at j. Key j is visible to a query at position p when
  p - left <= j <= p + right and j < kv_len (causal is right = 0; "no window" is a huge left).
- Tiles are [rows, D_PAD]: D padded to a power of two (at least 16), the padding read as 0.
  RoPE is not applied here: q and k arrive rotated (kernels/flash_rope.py).
- Scores stay raw (q.k^T, ALiBi bias in raw units) until exp2, whose FMA applies
  scale * log2(e) (scale > 0): one multiply per score fewer than scaling the tile first.
- Packed sequences (VARLEN, FlashAttention's varlen layout): the pack is one batch row of
  sequences laid end to end, CU_SEQLENS int32 [N + 1] their offsets; program b of a grid's
  batch axis is sequence b, rows and positions count from its first row (sequence), so every
  bound above (T, S, kv_len) is that sequence's own length and no read crosses into the next.
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
def vector_source(base, n, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """Where [BLOCK] pieces of a float32 vector [n] (16-byte-aligned base with TMA) are read from.
    Pieces under 128 bytes take pointers: the copy engine writes shared memory 128-byte aligned,
    and triton 3.6 aligned a 64-byte piece's buffer to 64 (misaligned address at BLOCK = 16, H200)."""
    if TMA and BLOCK >= 32:
        source = tl.make_tensor_descriptor(base, shape=[n], strides=[1], block_shape=[BLOCK])
    else:
        source = base
    return source


@triton.jit
def read_vector(source, start, n, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """x[start : start + BLOCK] from a vector_source; out of range reads 0."""
    if TMA and BLOCK >= 32:
        x = source.load([start])
    else:
        at = start + tl.arange(0, BLOCK)
        x = tl.load(source + at, mask=at < n, other=0.0)
    return x


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in float32 (acc None: a @ b)."""
    if _DOT_IN_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


# The edges of the visible band a masked tile must test (FlashProblem.edges), so that the common
# problems test one: causal needs RIGHT_EDGE alone (a key at or past S is past every valid query's
# position too), bidirectional LENGTH_EDGE alone.
LEFT_EDGE = tl.constexpr(1)  # keys before pos - left: a sliding window
RIGHT_EDGE = tl.constexpr(2)  # keys after pos + right: causal, or a window's right side
LENGTH_EDGE = tl.constexpr(4)  # keys at or past kv_len: padding, or a partial last tile


@triton.jit
def score_tile(s, pos_q, pos_k, kv_len, left, right, alibi_slope, ALIBI: tl.constexpr, MASKED: tl.constexpr, EDGES: tl.constexpr):
    """Raw q.k^T scores with the ALiBi bias (alibi_slope: in raw-score units, from the function of
    that name), -inf where not visible; the caller scales by scale_log2 inside its exp2's FMA.

    pos_q and pos_k broadcast against s ([M, 1] and [1, N], or transposed)."""
    if ALIBI:
        # in float32 (positions < 2^24 are exact): a subtract and an FMA per score, the int->float
        # conversions stay on the row and column vectors
        s -= alibi_slope * tl.abs(pos_q.to(tl.float32) - pos_k.to(tl.float32))
    if MASKED:
        visible = pos_k < kv_len
        if RIGHT_EDGE & EDGES:
            before_right = pos_k <= pos_q + right
            if LENGTH_EDGE & EDGES:
                visible = visible & before_right
            else:
                visible = before_right
        if LEFT_EDGE & EDGES:
            visible = visible & (pos_k >= pos_q - left)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def alibi_slope(SLOPES, h, scale_log2, ALIBI: tl.constexpr):
    """Head h's ALiBi slope in units of the raw q.k scores (slope / scale), 0 without ALiBi."""
    return tl.load(SLOPES + h) * 1.4426950408889634 / scale_log2 if ALIBI else 0.0


@triton.jit
def sequence(CU_SEQLENS, b, T, S, VARLEN: tl.constexpr):
    """Where the b-th sequence of a launch lies: (batch row, first row, T, S). Packed (VARLEN):
    rows first .. first + T - 1 of the pack's one batch row, T = S its length (CU_SEQLENS[b + 1]
    - CU_SEQLENS[b]); otherwise batch row b from row 0, T and S as given."""
    if VARLEN:
        first = tl.load(CU_SEQLENS + b)
        T = tl.load(CU_SEQLENS + b + 1) - first
        S = T
        b = 0
    else:
        first = 0
    return b, first, T, S


@triton.jit
def row_offset(b, first, stride_b, stride_t):
    """Element offset of row ``first`` of batch row b, in int64 (a batch or a pack can pass 2^31
    elements); b and first may be the constant 0 (sequence)."""
    return tl.cast(b, tl.int64) * stride_b + tl.cast(first, tl.int64) * stride_t


@triton.jit
def query_program(
    SEQ_LENS, CU_SEQLENS, SLOPES, T, S, HQ, GROUP, scale_log2,
    CAUSAL: tl.constexpr, HAS_SEQ_LENS: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr,
):
    """Who a program of grid (query blocks, B * Hq) is (packed: (blocks of the longest sequence,
    N * Hq)): (query block, its statistics row b * Hq + h, batch row b, q head h, kv head, first
    row, T, S, visible keys kv_len, alibi_slope), rows and lengths as ``sequence`` gives them.
    Causal: longest rows first, so the short ones fill the tail of the schedule."""
    block = tl.program_id(0)
    if CAUSAL:
        block = tl.num_programs(0) - 1 - block
    b = tl.program_id(1) // HQ
    h = tl.program_id(1) % HQ
    b, first, T, S = sequence(CU_SEQLENS, b, T, S, VARLEN)
    kv_len = tl.load(SEQ_LENS + b) if HAS_SEQ_LENS else S
    kv_len = tl.minimum(kv_len, S)
    return block, b * HQ + h, b, h, h // GROUP, first, T, S, kv_len, alibi_slope(SLOPES, h, scale_log2, ALIBI)


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


@triton.jit
def listed_ranges(LIST, num, lo, full_lo, full_hi, hi, SPARSE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """key_blocks' (or query_blocks') bounds lo <= full_lo <= full_hi <= hi in rows, restated as
    positions in the list of TILE-row tiles of the num blocks LIST holds (SPARSE_BLOCK-row blocks,
    ascending): each bound becomes the number of listed tiles that start before it. The listed
    tiles are ascending too, so positions [a, b) are exactly the listed tiles a dense loop over
    rows [bound_a, bound_b) would visit, the masked / unmasked split included; tile_start maps a
    position back to its first row. One pass over the list, CHUNK entries at a time."""
    CHUNK: tl.constexpr = 64
    per_block: tl.constexpr = SPARSE_BLOCK // TILE
    n_lo = 0
    n_full_lo = 0
    n_full_hi = 0
    n_hi = 0
    for c in range(0, num, CHUNK):
        n = c + tl.arange(0, CHUNK)
        listed = n < num
        start = tl.load(LIST + n, mask=listed, other=0) * SPARSE_BLOCK
        n_lo += tl.sum(tl.where(listed, tl.minimum(tl.cdiv(tl.maximum(lo - start, 0), TILE), per_block), 0))
        n_full_lo += tl.sum(tl.where(listed, tl.minimum(tl.cdiv(tl.maximum(full_lo - start, 0), TILE), per_block), 0))
        n_full_hi += tl.sum(tl.where(listed, tl.minimum(tl.cdiv(tl.maximum(full_hi - start, 0), TILE), per_block), 0))
        n_hi += tl.sum(tl.where(listed, tl.minimum(tl.cdiv(tl.maximum(hi - start, 0), TILE), per_block), 0))
    return n_lo, n_full_lo, n_full_hi, n_hi


@triton.jit
def tile_start(LIST, n, SPARSE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """First row of the tile a loop is at: n itself on a dense range (n steps by TILE through rows);
    block-sparse, the n-th listed tile of listed_ranges (n steps by 1 through the list LIST)."""
    if SPARSE_BLOCK:
        per_block: tl.constexpr = SPARSE_BLOCK // TILE
        start = tl.load(LIST + n // per_block) * SPARSE_BLOCK + (n % per_block) * TILE
    else:
        start = n
    return start
