"""ExpoSB's tile helpers (@triton.jit, inlined into the prepass and the forward and backward
kernels): the per-head parameters, RoPE tables, x' = f * r * R x of a block of rows and its
gradient's way back (prepass and backward epilogues, once per row), plain tile loads, the distance
decay's factors per tile regime (a pivot, the owned side's factor, the loop side's tile weight)
and the key and query ranges of each regime, split for masking. kernels/exposb.py has the math."""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # globals read inside @triton.jit must be constexpr

# tile regimes, by where the key tile lies relative to the query tile
BELOW = tl.constexpr(0)  # every key n <= every query position m
DIAGONAL = tl.constexpr(1)  # the tile straddles the diagonal
ABOVE = tl.constexpr(2)  # every key n > every query position m


@triton.jit
def head_params(LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF: tl.constexpr):
    """Head h's scalars and its channel filter f and band, as halves [D/2] (channels j and j + D/2)."""
    lam, alpha, beta = tl.load(LAM + h), tl.load(ALPHA + h), tl.load(BETA + h)
    gamma, mu, sigma, delta = tl.load(GAMMA + h), tl.load(MU + h), tl.load(SIGMA + h), tl.load(DELTA + h)
    j1 = tl.arange(0, HALF).to(tl.float32)
    j2 = j1 + HALF
    band1 = tl.exp(-(j1 - mu) * (j1 - mu) / (2.0 * sigma * sigma))
    band2 = tl.exp(-(j2 - mu) * (j2 - mu) / (2.0 * sigma * sigma))
    return lam, alpha, gamma, mu, sigma, delta, beta + gamma * band1, beta + gamma * band2, band1, band2


@triton.jit
def cos_sin(COS, SIN, pos, inside, HALF: tl.constexpr):
    """cos, sin [R, D/2] of positions pos [R] (tables [S, D/2]); rows outside read zeros."""
    at = pos[:, None] * HALF + tl.arange(0, HALF)[None, :]
    return tl.load(COS + at, mask=inside, other=0.0), tl.load(SIN + at, mask=inside, other=0.0)


@triton.jit
def load_transformed(ptr, stride_row, stride_col, rows, pos, n_rows, COS, SIN, lam, alpha, f1, f2, HALF: tl.constexpr):
    """Rows ``rows`` [R] (at positions ``pos`` [R]) of a [n_rows, D] slice at ``ptr``, transformed.

    Returns x' = f * r * R x as halves x'_1, x'_2 [R, D/2] fp32, the rotated halves (R x)_1,
    (R x)_2 and r [R]. Rows >= n_rows read as zeros.
    """
    half = tl.arange(0, HALF)
    inside = (rows < n_rows)[:, None]
    row_ptr = ptr + rows[:, None] * stride_row
    x1 = tl.load(row_ptr + half[None, :] * stride_col, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptr + (half + HALF)[None, :] * stride_col, mask=inside, other=0.0).to(tl.float32)
    c, s = cos_sin(COS, SIN, pos, inside, HALF)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    r = 1.0 + alpha * tl.exp2(-lam * LOG2E * pos.to(tl.float32))
    return y1 * r[:, None] * f1[None, :], y2 * r[:, None] * f2[None, :], y1, y2, r


@triton.jit
def input_grad(g1, g2, r, f1, f2, COS, SIN, pos, inside, HALF: tl.constexpr):
    """dx = r * R^T (f * g) from g = dL/dx' given as halves [R, D/2]; returns dx as halves."""
    c, s = cos_sin(COS, SIN, pos, inside, HALF)
    h1 = g1 * f1[None, :]
    h2 = g2 * f2[None, :]
    return (h1 * c + h2 * s) * r[:, None], (h2 * c - h1 * s) * r[:, None]


@triton.jit
def store_rows(ptr, stride_row, stride_col, rows, inside, x1, x2, HALF: tl.constexpr):
    """Store halves x1, x2 [R, D/2] as rows of a [*, D] tensor at ptr."""
    half = tl.arange(0, HALF)
    row_ptr = ptr + rows[:, None] * stride_row
    tl.store(row_ptr + half[None, :] * stride_col, x1.to(ptr.dtype.element_ty), mask=inside)
    tl.store(row_ptr + (half + HALF)[None, :] * stride_col, x2.to(ptr.dtype.element_ty), mask=inside)


@triton.jit
def load_tile(ptr, stride_row, stride_col, rows, n_rows, D: tl.constexpr):
    """Rows ``rows`` [R] of a [n_rows, D] slice at ``ptr`` as one [R, D] tile; rows >= n_rows read zeros."""
    cols = tl.arange(0, D)
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=(rows < n_rows)[:, None], other=0.0)


@triton.jit
def halves(x, R: tl.constexpr, D: tl.constexpr):
    """x [R, D] as its rotate-half pairs x[:, :D/2], x[:, D/2:] (the epilogues' layout; once per program)."""
    return tl.split(tl.permute(tl.reshape(x, [R, 2, D // 2]), (0, 2, 1)))


@triton.jit
def whole(x1, x2, R: tl.constexpr, D: tl.constexpr):
    """Halves x1, x2 [R, D/2] as one [R, D] tile (halves' inverse)."""
    return tl.reshape(tl.permute(tl.join(x1, x2), (0, 2, 1)), [R, D])


# exp2's argument floor in a program factor (owner_factor): 2^-126, the smallest normal float32
FACTOR_FLOOR = tl.constexpr(-126.0)


@triton.jit
def query_block_pivot(pos_q0, REGIME: tl.constexpr, BLOCK_M: tl.constexpr):
    """The pivot p of an off-diagonal regime of the query block starting at position pos_q0: its
    first position BELOW (every key n <= p <= m), its last ABOVE (m <= p < n), so that
    |m - n| = |m - p| + |p - n| for every score of the regime."""
    pivot = pos_q0
    if REGIME == ABOVE:
        pivot = pos_q0 + BLOCK_M - 1
    return pivot


@triton.jit
def key_block_pivot(n0, REGIME: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same pivot for the key block starting at n0: its last key BELOW, its first ABOVE."""
    pivot = n0
    if REGIME == BELOW:
        pivot = n0 + BLOCK_N - 1
    return pivot


@triton.jit
def pivot_distance(pos, pivot):
    """|pos - pivot| in float32 (positions [R] on one side of the pivot)."""
    return tl.abs(pos - pivot).to(tl.float32)


@triton.jit
def owner_factor(pos, pivot, rate, scale, REGIME: tl.constexpr):
    """The decay's factor [R] on the side whose rows pos [R] the program owns, formed once per
    regime: off the diagonal scale * exp2(-rate |pos - pivot|) (rate = delta log2(e)), so that
    w_mn = owner_factor * tile_weight; on the diagonal 1 (its tile weight is whole).

    The exponent is floored at 2^-126 (FACTOR_FLOOR) so the factor stays > 0: the forward multiplies
    masked scores (-inf) by it, and -inf * 0 is NaN. The floor changes only weights below
    2^-126 * scale, whose scores (< 1e-38 |q'.k'|) are lost beside any other of the row."""
    if REGIME == DIAGONAL:
        factor = tl.zeros_like(pos).to(tl.float32) + 1.0
    else:
        factor = scale * tl.exp2(tl.maximum(-rate * pivot_distance(pos, pivot), FACTOR_FLOOR))
    return factor


@triton.jit
def tile_weight(rows, cols, pivot, rate, scale, REGIME: tl.constexpr):
    """The rest of the decay per tile, for the owned positions rows [R] and the loop's positions
    cols [C]: on the diagonal the whole weight scale * exp2(-rate |m - n|) per score [R, C]; off it
    the loop side's factor exp2(-rate |col - pivot|) [1, C], which may underflow to 0 (it multiplies
    finite scores, before any mask)."""
    if REGIME == DIAGONAL:
        w = scale * tl.exp2(-rate * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32))
    else:
        w = tl.exp2(-rate * pivot_distance(cols, pivot))[None, :]
    return w


@triton.jit
def visible(m, n, kv_len, REGIME: tl.constexpr, CAUSAL: tl.constexpr):
    """Which scores of a masked tile count (m, n broadcastable: [BM, 1] and [1, BN], or transposed):
    keys before kv_len, and (on the diagonal, causal) n <= m."""
    keep = n < kv_len
    if CAUSAL and REGIME == DIAGONAL:
        keep = keep & (n <= m)
    return keep


@triton.jit
def key_ranges(pos_q0, kv_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile bounds for the query block starting at position pos_q0, in key order:
    BELOW [0, below_end), DIAGONAL [below_end, above_start), ABOVE [above_start, hi). Of BELOW and
    ABOVE, tiles before below_full and above_full hold only keys < kv_len (no mask); the rest,
    at most the one tile that kv_len cuts, is masked. Returns below_full, below_end, above_start,
    above_full, hi."""
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, pos_q0 + BLOCK_M)
    below_end = tl.minimum((pos_q0 + 1) // BLOCK_N * BLOCK_N, hi)  # n0 + BLOCK_N - 1 <= pos_q0
    above_start = tl.minimum(tl.cdiv(pos_q0 + BLOCK_M, BLOCK_N) * BLOCK_N, hi)  # n0 >= pos_q0 + BLOCK_M
    full_end = kv_len // BLOCK_N * BLOCK_N
    below_full = tl.minimum(below_end, full_end)
    above_full = tl.minimum(tl.maximum(above_start, full_end), hi)
    return below_full, below_end, above_start, above_full, hi


@triton.jit
def query_ranges(n0, kv_len, T, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-tile bounds (row indices) for the key block starting at n0, in query order:
    ABOVE [lo, above_end), DIAGONAL [above_end, below_start), BELOW [below_start, hi). A key block
    that kv_len cuts masks every tile (ABOVE and BELOW wholly masked: above_full = lo,
    below_full = below_start); otherwise ABOVE and BELOW need no mask (above_full = above_end,
    below_full = hi). Returns lo, above_full, above_end, below_start, below_full, hi."""
    hi = tl.where(n0 < kv_len, T, 0)  # a block of padding keys gets no gradient
    above_end = tl.minimum(tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M, hi)  # pos_q0 + BLOCK_M <= n0
    below_start = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, hi)
    lo = above_end if CAUSAL else 0  # causal: keys above every query are never seen
    full = n0 + BLOCK_N <= kv_len
    return lo, tl.where(full, above_end, lo), above_end, below_start, tl.where(full, hi, below_start), hi
