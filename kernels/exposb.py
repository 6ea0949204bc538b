"""ExpoSB attention: RoPE with a decaying modulation, a learnable band filter over the head
dimension and a multiplicative distance decay, fused into a flash-attention kernel.

Layout: q [B, T, Hq, D], k/v [B, S, Hkv, D] (any strides), o [B, T, Hq, D]; Hq % Hkv == 0.
Positions: keys n = 0 .. S-1, query i at m = i + S - T (S >= T; self-attention: m = i).

Math, per query head h (every parameter is a float32 [Hq] tensor, one value per query head;
with GQA, k' for query head h is its kv head's k transformed with head h's parameters):

    R_p x          rotate-half RoPE rotation at position p: angle of pair i is p * 10000^(-2i/D)
    r_p            = 1 + alpha * exp(-lam * p)                      (modulation of the rotation)
    band_j         = exp(-(j - mu)^2 / (2 sigma^2)),  f_j = beta + gamma * band_j
    q'_m           = f * r_m * R_m q_m,   k'_n = f * r_n * R_n k_n   (elementwise f over j)
    w_mn           = exp(-delta * |m - n|)
    s_mn           = (q'_m . k'_n) * w_mn / sqrt(D);   P = softmax_n(s) over visible keys;   o = P v

Forward (flash skeleton): each program owns BLOCK_M query rows; q' is formed once in
registers from q and cos/sin tables, k' for every key tile as it is loaded (nothing of q', k'
or the T x S scores reaches memory). Online softmax in base 2; the LSE is saved.
Every q', k' (and dq', dk') tile is held as its two halves [rows, D/2], the rotate-half pairs:
the rotation is then elementwise on the halves, and q'.k' = q'_1.k'_1 + q'_2.k'_2 is two
dots of depth D/2 (the same tensor-core work as one of depth D; D/2 >= 16, so D >= 32).
Off the diagonal, the distance splits at a pivot p between the query and key blocks,
|m - n| = |m - p| + |p - n|, so the decay tile is an outer product of BLOCK_M + BLOCK_N
exponentials (a multiply per score, no extra exp); only tiles that straddle the diagonal
pay one exp per score.

Backward (FA2): D_m = rowsum(dO_m * O_m), O kept in float32 by the forward when a gradient
is needed (see _ExpoSBAttention.forward); P recomputed from the LSE;
    dP = dO V^T,   dS = P * (dP - D_m)                   (dL/ds)
    dV = P^T dO
    dX = dS * w / sqrt(D)                                (dL/d(q'.k'), through the decay)
    dq' = dX k',   dk' = dX^T q'                         (dk' per query head of a kv head)
    d delta = sum_mn dS_mn * s_mn * (-|m - n|)
Through q' = f * r * R q (per row, in the kernels' epilogues; the same for k with n):
    dq_m       = r_m * R_m^T (f * dq'_m)                  (R^T on halves: g1 c + g2 s, g2 c - g1 s)
    dr_m       = sum_j dq'_mj * f_j * (R_m q_m)_j
    d alpha    = sum_m dr_m * exp(-lam m),   d lam = sum_m dr_m * alpha * exp(-lam m) * (-m)
    df_j       = sum_m dq'_mj * r_m * (R_m q_m)_j
    d beta     = sum_j df_j,                 d gamma = sum_j df_j * band_j
    d mu       = sum_j df_j * gamma * band_j * (j - mu) / sigma^2
    d sigma    = sum_j df_j * gamma * band_j * (j - mu)^2 / sigma^3
Every program writes its partial sums of the seven parameter gradients to a small
[7, B, blocks, Hq] buffer; torch sums it (a cheap epilogue).

Kernels: dq (one program per query block and query head, also d delta) and dk/dv (one
program per key block and query head: each query head has its own k', so with GQA the
launcher sums the group's per-head dk, dv).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnbench.kernels.reference import rope_angles

ROPE_BASE = 10000.0
PARAM_NAMES = ("lam", "alpha", "beta", "gamma", "mu", "sigma", "delta")
LOG2E = tl.constexpr(1.4426950408889634)  # globals read inside @triton.jit must be constexpr

# tile regimes, by where the key tile lies relative to the query tile
BELOW = tl.constexpr(0)  # every key n <= every query position m
DIAGONAL = tl.constexpr(1)  # the tile straddles the diagonal
ABOVE = tl.constexpr(2)  # every key n > every query position m


@triton.jit
def _head_params(LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF: tl.constexpr):
    """Head h's scalars and its channel filter f and band, as halves [D/2] (channels j and j + D/2)."""
    lam, alpha, beta = tl.load(LAM + h), tl.load(ALPHA + h), tl.load(BETA + h)
    gamma, mu, sigma, delta = tl.load(GAMMA + h), tl.load(MU + h), tl.load(SIGMA + h), tl.load(DELTA + h)
    j1 = tl.arange(0, HALF).to(tl.float32)
    j2 = j1 + HALF
    band1 = tl.exp(-(j1 - mu) * (j1 - mu) / (2.0 * sigma * sigma))
    band2 = tl.exp(-(j2 - mu) * (j2 - mu) / (2.0 * sigma * sigma))
    return lam, alpha, gamma, mu, sigma, delta, beta + gamma * band1, beta + gamma * band2, band1, band2


@triton.jit
def _cos_sin(COS, SIN, pos, inside, HALF: tl.constexpr):
    """cos, sin [R, D/2] of positions pos [R] (tables [S, D/2]); rows outside read zeros."""
    at = pos[:, None] * HALF + tl.arange(0, HALF)[None, :]
    return tl.load(COS + at, mask=inside, other=0.0), tl.load(SIN + at, mask=inside, other=0.0)


@triton.jit
def _load_transformed(ptr, stride_row, stride_col, rows, pos, n_rows, COS, SIN, lam, alpha, f1, f2, HALF: tl.constexpr):
    """Rows ``rows`` [R] (at positions ``pos`` [R]) of a [n_rows, D] slice at ``ptr``, transformed.

    Returns x' = f * r * R x as halves x'_1, x'_2 [R, D/2] fp32, the rotated halves (R x)_1,
    (R x)_2 and r [R]. Rows >= n_rows read as zeros.
    """
    half = tl.arange(0, HALF)
    inside = (rows < n_rows)[:, None]
    row_ptr = ptr + rows[:, None] * stride_row
    x1 = tl.load(row_ptr + half[None, :] * stride_col, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(row_ptr + (half + HALF)[None, :] * stride_col, mask=inside, other=0.0).to(tl.float32)
    c, s = _cos_sin(COS, SIN, pos, inside, HALF)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    r = 1.0 + alpha * tl.exp2(-lam * LOG2E * pos.to(tl.float32))
    return y1 * r[:, None] * f1[None, :], y2 * r[:, None] * f2[None, :], y1, y2, r


@triton.jit
def _input_grad(g1, g2, r, f1, f2, COS, SIN, pos, inside, HALF: tl.constexpr):
    """dx = r * R^T (f * g) from g = dL/dx' given as halves [R, D/2]; returns dx as halves."""
    c, s = _cos_sin(COS, SIN, pos, inside, HALF)
    h1 = g1 * f1[None, :]
    h2 = g2 * f2[None, :]
    return (h1 * c + h2 * s) * r[:, None], (h2 * c - h1 * s) * r[:, None]


@triton.jit
def _store_rows(ptr, stride_row, stride_col, rows, inside, x1, x2, HALF: tl.constexpr):
    """Store halves x1, x2 [R, D/2] as rows of a [*, D] tensor at ptr."""
    half = tl.arange(0, HALF)
    row_ptr = ptr + rows[:, None] * stride_row
    tl.store(row_ptr + half[None, :] * stride_col, x1.to(ptr.dtype.element_ty), mask=inside)
    tl.store(row_ptr + (half + HALF)[None, :] * stride_col, x2.to(ptr.dtype.element_ty), mask=inside)


@triton.jit
def _scores(a1, a2, b1, b2, DOT_PRECISION: tl.constexpr):
    """a . b^T [Ra, Rb] for a, b given as halves."""
    qk = tl.dot(a1, tl.trans(b1), input_precision=DOT_PRECISION)
    return tl.dot(a2, tl.trans(b2), acc=qk, input_precision=DOT_PRECISION)


@triton.jit
def _distance_weight(pos_q, pos_k, pos_q0, delta, REGIME: tl.constexpr, BLOCK_M: tl.constexpr):
    """w = exp(-delta |m - n|) [BLOCK_M, BLOCK_N] for query positions pos_q (block start pos_q0), keys pos_k.

    Off the diagonal the pivot keeps both factors <= 1, so neither overflows.
    """
    rate = delta * LOG2E
    if REGIME == BELOW:  # n <= pos_q0 <= m: |m - n| = (m - pos_q0) + (pos_q0 - n)
        row = tl.exp2(-rate * (pos_q - pos_q0).to(tl.float32))
        col = tl.exp2(-rate * (pos_q0 - pos_k).to(tl.float32))
        w = row[:, None] * col[None, :]
    elif REGIME == ABOVE:  # m <= pivot < n
        pivot = pos_q0 + BLOCK_M - 1
        row = tl.exp2(-rate * (pivot - pos_q).to(tl.float32))
        col = tl.exp2(-rate * (pos_k - pivot).to(tl.float32))
        w = row[:, None] * col[None, :]
    else:
        w = tl.exp2(-rate * tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32))
    return w


@triton.jit
def _visible(pos_q, pos_k, kv_len, REGIME: tl.constexpr, CAUSAL: tl.constexpr):
    """Which scores of the tile count: keys before kv_len, and (on the diagonal, causal) n <= m."""
    keep = (pos_k < kv_len)[None, :]
    if CAUSAL and REGIME == DIAGONAL:
        keep = keep & (pos_k[None, :] <= pos_q[:, None])
    return keep


@triton.jit
def _key_ranges(pos_q0, kv_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile bounds for the query block starting at position pos_q0:
    BELOW [0, below_end), DIAGONAL [below_end, above_start), ABOVE [above_start, hi)."""
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, pos_q0 + BLOCK_M)
    below_end = tl.minimum((pos_q0 + 1) // BLOCK_N * BLOCK_N, hi)  # n0 + BLOCK_N - 1 <= pos_q0
    above_start = tl.minimum(tl.cdiv(pos_q0 + BLOCK_M, BLOCK_N) * BLOCK_N, hi)  # n0 >= pos_q0 + BLOCK_M
    return below_end, above_start, hi


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q1, q2, pos_q, pos_q0, lo, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd, S, kv_len,
    COS, SIN, lam, alpha, f1, f2, delta, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) of one regime (base 2: exp2 and log2 units)."""
    cols = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        pos_k = n0 + tl.arange(0, BLOCK_N)
        k1, k2, _, _, _ = _load_transformed(K, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, D // 2)
        v = tl.load(V + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd, mask=(pos_k < S)[:, None], other=0.0)
        qk = _scores(q1, q2, k1.to(q1.dtype), k2.to(q1.dtype), DOT_PRECISION)  # [BM, BN]
        w = _distance_weight(pos_q, pos_k, pos_q0, delta, REGIME, BLOCK_M)
        s2 = qk * w * (sm_scale * LOG2E)
        s2 = tl.where(_visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s2 - m_safe[:, None])
        correction = tl.exp2(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _exposb_fwd_kernel(
    Q, K, V, O, LSE, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, SEQ_LENS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    H, GROUP, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head). LSE [B, Hq, T] in log2 units."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    lam, alpha, _, _, _, delta, f1, f2, _, _ = _head_params(LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, D // 2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    q_base = Q + b * stride_qb + h * stride_qh
    # q' stays in registers for the whole loop
    q1, q2, _, _, _ = _load_transformed(q_base, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, D // 2)
    q1 = q1.to(Q.dtype.element_ty)
    q2 = q2.to(Q.dtype.element_ty)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    below_end, above_start, hi = _key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q1, q2, pos_q, pos_q0, 0, below_end, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        S, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale, BELOW, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q1, q2, pos_q, pos_q0, below_end, above_start, k_base, v_base, stride_kt, stride_kd, stride_vt,
        stride_vd, S, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale, DIAGONAL, CAUSAL, D, BLOCK_M, BLOCK_N,
        DOT_PRECISION,
    )
    if not CAUSAL:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q1, q2, pos_q, pos_q0, above_start, hi, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, S, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale, ABOVE, CAUSAL, D, BLOCK_M, BLOCK_N,
            DOT_PRECISION,
        )

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that see no key: zeros
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # +inf: P = 0 in backward
    cols = tl.arange(0, D)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + cols[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(rows < T)[:, None])
    tl.store(LSE + (b * H + h) * T + rows, lse, mask=rows < T)


@triton.jit
def _band_partials(d_f, band, j, gamma, mu, sigma):
    """d beta, d gamma, d mu, d sigma from df [D/2] over one half of the channels j [D/2]."""
    d_band = d_f * gamma * band  # df_j times d f_j / d(-(j - mu)^2 / (2 sigma^2))
    return (
        tl.sum(d_f, 0),
        tl.sum(d_f * band, 0),
        tl.sum(d_band * (j - mu), 0) / (sigma * sigma),
        tl.sum(d_band * (j - mu) * (j - mu), 0) / (sigma * sigma * sigma),
    )


@triton.jit
def _store_param_partials(
    PARTIALS, slot, stride_param, g1, g2, y1, y2, r, pos, f1, f2, band1, band2, lam, alpha, gamma, mu, sigma,
    HALF: tl.constexpr,
):
    """Partial sums of d lam, d alpha, d beta, d gamma, d mu, d sigma from the rows of one tile.

    g = dL/dx', y = R x (halves [R, D/2]), r [R] at positions pos [R] (module docstring).
    Rows outside the sequence have g = 0 or y = 0, so they add nothing.
    """
    dr = tl.sum(g1 * y1 * f1[None, :], 1) + tl.sum(g2 * y2 * f2[None, :], 1)  # [R]
    decay = tl.exp2(-lam * LOG2E * pos.to(tl.float32))
    j1 = tl.arange(0, HALF).to(tl.float32)
    beta1, gamma1, mu1, sigma1 = _band_partials(tl.sum(g1 * y1 * r[:, None], 0), band1, j1, gamma, mu, sigma)
    beta2, gamma2, mu2, sigma2 = _band_partials(tl.sum(g2 * y2 * r[:, None], 0), band2, j1 + HALF, gamma, mu, sigma)
    tl.store(PARTIALS + 0 * stride_param + slot, tl.sum(dr * alpha * decay * -pos.to(tl.float32), 0))
    tl.store(PARTIALS + 1 * stride_param + slot, tl.sum(dr * decay, 0))
    tl.store(PARTIALS + 2 * stride_param + slot, beta1 + beta2)
    tl.store(PARTIALS + 3 * stride_param + slot, gamma1 + gamma2)
    tl.store(PARTIALS + 4 * stride_param + slot, mu1 + mu2)
    tl.store(PARTIALS + 5 * stride_param + slot, sigma1 + sigma2)


@triton.jit
def _dq_tiles(
    dq1, dq2, d_delta, q1, q2, do, lse, di, pos_q, pos_q0, lo, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
    S, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq' += dX k' and the rows' d delta over the key tiles [lo, hi) of one regime."""
    cols = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        pos_k = n0 + tl.arange(0, BLOCK_N)
        k1, k2, _, _, _ = _load_transformed(K, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, D // 2)
        k1 = k1.to(q1.dtype)
        k2 = k2.to(q1.dtype)
        v = tl.load(V + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd, mask=(pos_k < S)[:, None], other=0.0)
        w = _distance_weight(pos_q, pos_k, pos_q0, delta, REGIME, BLOCK_M)
        s = _scores(q1, q2, k1, k2, DOT_PRECISION) * w * sm_scale  # [BM, BN], finite
        p = tl.where(_visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - di[:, None])
        dx = (ds * w * sm_scale).to(k1.dtype)
        dq1 += tl.dot(dx, k1, input_precision=DOT_PRECISION)
        dq2 += tl.dot(dx, k2, input_precision=DOT_PRECISION)
        distance = tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        d_delta -= tl.sum(ds * s * distance, 1)
    return dq1, dq2, d_delta


@triton.jit
def _exposb_dq_kernel(
    Q, K, V, DO, DQ, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, SEQ_LENS, PARTIALS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_param, H, GROUP, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dq of BLOCK_M query rows of one (batch, query head), with the q side's and
    d delta's parameter partials in PARTIALS [7, B, cdiv(T, BLOCK_M), Hq]."""
    HALF: tl.constexpr = D // 2
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    lam, alpha, gamma, mu, sigma, delta, f1, f2, band1, band2 = _head_params(
        LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF
    )

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    cols = tl.arange(0, D)
    inside = rows < T
    q1, q2, _, _, _ = _load_transformed(
        Q + b * stride_qb + h * stride_qh, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, HALF
    )
    q1 = q1.to(Q.dtype.element_ty)
    q2 = q2.to(Q.dtype.element_ty)
    do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + cols[None, :] * stride_dod
    do = tl.load(do_ptrs, mask=inside[:, None], other=0.0)
    lse = tl.load(LSE + (b * H + h) * T + rows, mask=inside, other=float("inf"))
    di = tl.load(DI + (b * H + h) * T + rows, mask=inside, other=0.0)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh

    dq1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    d_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    below_end, above_start, hi = _key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    dq1, dq2, d_delta = _dq_tiles(
        dq1, dq2, d_delta, q1, q2, do, lse, di, pos_q, pos_q0, 0, below_end, k_base, v_base, stride_kt, stride_kd,
        stride_vt, stride_vd, S, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale, BELOW, CAUSAL, D, BLOCK_M,
        BLOCK_N, DOT_PRECISION,
    )
    dq1, dq2, d_delta = _dq_tiles(
        dq1, dq2, d_delta, q1, q2, do, lse, di, pos_q, pos_q0, below_end, above_start, k_base, v_base, stride_kt,
        stride_kd, stride_vt, stride_vd, S, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale, DIAGONAL, CAUSAL, D,
        BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    if not CAUSAL:
        dq1, dq2, d_delta = _dq_tiles(
            dq1, dq2, d_delta, q1, q2, do, lse, di, pos_q, pos_q0, above_start, hi, k_base, v_base, stride_kt,
            stride_kd, stride_vt, stride_vd, S, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale, ABOVE, CAUSAL,
            D, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )

    # epilogue: q' again in fp32 (R q and r are needed for the parameter gradients)
    _, _, y1, y2, r = _load_transformed(
        Q + b * stride_qb + h * stride_qh, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, HALF
    )
    dx1, dx2 = _input_grad(dq1, dq2, r, f1, f2, COS, SIN, pos_q, inside[:, None], HALF)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, stride_dqt, stride_dqd, rows, inside[:, None], dx1, dx2, HALF)
    slot = (b * tl.num_programs(0) + pid_m) * H + h
    _store_param_partials(
        PARTIALS, slot, stride_param, dq1, dq2, y1, y2, r, pos_q, f1, f2, band1, band2, lam, alpha, gamma, mu, sigma, HALF
    )
    tl.store(PARTIALS + 6 * stride_param + slot, tl.sum(d_delta, 0))


@triton.jit
def _query_ranges(n0, kv_len, T, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-tile bounds (row indices) for the key block starting at n0:
    ABOVE [lo, above_end), DIAGONAL [above_end, below_start), BELOW [below_start, hi)."""
    hi = tl.where(n0 < kv_len, T, 0)  # a block of padding keys gets no gradient
    above_end = tl.minimum(tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M, hi)  # pos_q0 + BLOCK_M <= n0
    below_start = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, hi)
    lo = above_end if CAUSAL else 0  # causal: keys above every query are never seen
    return lo, above_end, below_start, hi


@triton.jit
def _dkdv_tiles(
    dk1, dk2, dv, k1, k2, v, pos_k, lo, hi, Q, DO, LSE, DI, stride_qt, stride_qd, stride_dot, stride_dod,
    T, shift, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk' += dX^T q' and dv += P^T dO over the query tiles [lo, hi) of one regime, one query head."""
    cols = tl.arange(0, D)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        pos_q = rows + shift
        inside = rows < T
        q1, q2, _, _, _ = _load_transformed(Q, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, D // 2)
        q1 = q1.to(k1.dtype)
        q2 = q2.to(k1.dtype)
        do = tl.load(DO + rows[:, None] * stride_dot + cols[None, :] * stride_dod, mask=inside[:, None], other=0.0)
        lse = tl.load(LSE + rows, mask=inside, other=float("inf"))
        di = tl.load(DI + rows, mask=inside, other=0.0)
        w = _distance_weight(pos_q, pos_k, m0 + shift, delta, REGIME, BLOCK_M)
        s = _scores(q1, q2, k1, k2, DOT_PRECISION) * w * sm_scale  # [BM, BN]
        p = tl.where(_visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dx_t = tl.trans((p * (dp - di[:, None]) * w * sm_scale).to(k1.dtype))  # [BN, BM]
        dk1 += tl.dot(dx_t, q1, input_precision=DOT_PRECISION)
        dk2 += tl.dot(dx_t, q2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def _exposb_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, SEQ_LENS, PARTIALS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_param, H, GROUP, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: what query head h contributes to dk, dv of BLOCK_N keys of its kv head
    (DK, DV [B, S, Hq, D]: one slot per query head, since each has its own k'; the launcher sums
    a group's), and the k side's parameter partials in PARTIALS [7, B, cdiv(S, BLOCK_N), Hq].
    One head per program: a loop over a group's heads around the tile loops spills registers."""
    HALF: tl.constexpr = D // 2
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    shift = S - T
    n0 = pid_n * BLOCK_N
    pos_k = n0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    inside = (pos_k < S)[:, None]
    lam, alpha, gamma, mu, sigma, delta, f1, f2, band1, band2 = _head_params(
        LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF
    )
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    # this head's k' and the values stay in registers for the whole loop
    k1, k2, _, _, _ = _load_transformed(k_base, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, HALF)
    k1 = k1.to(K.dtype.element_ty)
    k2 = k2.to(K.dtype.element_ty)
    v_ptrs = V + b * stride_vb + (h // GROUP) * stride_vh + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=inside, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + (b * H + h) * T
    di_base = DI + (b * H + h) * T
    lo, above_end, below_start, hi = _query_ranges(n0, kv_len, T, shift, CAUSAL, BLOCK_M, BLOCK_N)

    g1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)  # dk' of this head, as halves
    g2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    g1, g2, dv = _dkdv_tiles(
        g1, g2, dv, k1, k2, v, pos_k, lo, above_end, q_base, do_base, lse_base, di_base, stride_qt, stride_qd,
        stride_dot, stride_dod, T, shift, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale, ABOVE, CAUSAL, D,
        BLOCK_M, DOT_PRECISION,
    )
    g1, g2, dv = _dkdv_tiles(
        g1, g2, dv, k1, k2, v, pos_k, above_end, below_start, q_base, do_base, lse_base, di_base, stride_qt,
        stride_qd, stride_dot, stride_dod, T, shift, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale,
        DIAGONAL, CAUSAL, D, BLOCK_M, DOT_PRECISION,
    )
    g1, g2, dv = _dkdv_tiles(
        g1, g2, dv, k1, k2, v, pos_k, below_start, hi, q_base, do_base, lse_base, di_base, stride_qt,
        stride_qd, stride_dot, stride_dod, T, shift, kv_len, COS, SIN, lam, alpha, f1, f2, delta, sm_scale,
        BELOW, CAUSAL, D, BLOCK_M, DOT_PRECISION,
    )

    # epilogue: k' again in fp32 (R k and r are needed for the parameter gradients)
    _, _, y1, y2, r = _load_transformed(k_base, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, HALF)
    dx1, dx2 = _input_grad(g1, g2, r, f1, f2, COS, SIN, pos_k, inside, HALF)
    _store_rows(DK + b * stride_dkb + h * stride_dkh, stride_dkt, stride_dkd, pos_k, inside, dx1, dx2, HALF)
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + pos_k[:, None] * stride_dvt + cols[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=inside)
    slot = (b * tl.num_programs(0) + pid_n) * H + h
    _store_param_partials(
        PARTIALS, slot, stride_param, g1, g2, y1, y2, r, pos_k, f1, f2, band1, band2, lam, alpha, gamma, mu, sigma, HALF
    )


# (BLOCK_M, BLOCK_N, num_warps) per kernel and largest head dim: picked so that ptxas reports
# no or little register spilling for sm_90 (to be tuned on the GPU)
_GPU_TILES = {
    64: {"fwd": (128, 64, 8), "dq": (64, 32, 8), "dkdv": (64, 64, 8)},
    128: {"fwd": (128, 64, 8), "dq": (32, 64, 8), "dkdv": (32, 64, 8)},
    256: {"fwd": (64, 32, 8), "dq": (32, 32, 8), "dkdv": (32, 32, 8)},
}
# under the CPU interpreter small tiles, so tests at T <= 64 cover every regime (below,
# diagonal, above) with several tiles each
_INTERPRETER_TILES = {"fwd": (16, 16, 1), "dq": (16, 16, 1), "dkdv": (16, 16, 1)}


def _tiles(device: torch.device, head_dim: int, kernel: str) -> tuple[int, int, dict]:
    """BLOCK_M, BLOCK_N and the launch options of ``kernel`` (fwd, dq or dkdv)."""
    if device.type != "cuda":
        block_m, block_n, _ = _INTERPRETER_TILES[kernel]
        return block_m, block_n, {}
    block_m, block_n, warps = _GPU_TILES[min(d for d in _GPU_TILES if d >= head_dim)][kernel]
    return block_m, block_n, {"num_warps": warps, "num_stages": 2}


@functools.lru_cache(maxsize=16)
def _angle_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [S, D/2] of the RoPE angles (the reference's own tables)."""
    return tuple(t.contiguous() for t in rope_angles(torch.arange(length, device=device), head_dim, ROPE_BASE))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"exposb: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit [B, T, Hq, D], [B, S, Hkv, D]")
    if d < 32 or d > 256 or d & (d - 1):
        raise ValueError(f"exposb triton kernel needs head_dim a power of two in [32, 256], not {d}")
    if k.shape[1] < t:
        raise ValueError("exposb triton kernel needs S >= T (queries are the last T positions)")
    for name, value in params.items():
        if value.shape != (hq,):
            raise ValueError(f"exposb: {name} must have shape [{hq}] (one value per query head), not {tuple(value.shape)}")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


def _forward(q, k, v, params, causal, seq_lens, out_dtype):
    """o [B, T, Hq, D] in ``out_dtype`` and the LSE [B, Hq, T] float32 in log2 units."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    lse = torch.empty(b, hq, t, device=q.device, dtype=torch.float32)
    cos, sin = _angle_tables(s, d, q.device)
    block_m, block_n, launch = _tiles(q.device, d, "fwd")
    grid = (triton.cdiv(t, block_m), b * hq)
    _exposb_fwd_kernel[grid](
        q, k, v, o, lse, cos, sin, *(params[name] for name in PARAM_NAMES), seq_lens,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        hq, hq // hkv, t, s, d**-0.5,
        HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), **launch,
    )
    return o, lse


def _backward(q, k, v, o, lse, do, params, causal, seq_lens):
    """dq, dk, dv (dtypes of q, k, v) and the parameter gradients float32 [7, Hq] (PARAM_NAMES order)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    di = (do.float() * o).sum(-1).transpose(1, 2).contiguous()  # D_m = rowsum(dO * O), O float32: [B, Hq, T]
    dq = torch.empty_like(q)
    # dk, dv per query head (each has its own k'), in float32 when a group's heads are then summed
    per_head = dict(device=k.device, dtype=k.dtype if hq == hkv else torch.float32)
    dk, dv = torch.empty(b, s, hq, d, **per_head), torch.empty(b, s, hq, d, **per_head)
    cos, sin = _angle_tables(s, d, q.device)
    common = dict(HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, DOT_PRECISION=_dot_precision(q.dtype))
    param_values = [params[name] for name in PARAM_NAMES]

    block_m, block_n, launch = _tiles(q.device, d, "dq")
    q_blocks = triton.cdiv(t, block_m)
    q_partials = torch.zeros(len(PARAM_NAMES), b, q_blocks, hq, device=q.device, dtype=torch.float32)
    _exposb_dq_kernel[(q_blocks, b * hq)](
        q, k, v, do, dq, lse, di, cos, sin, *param_values, seq_lens, q_partials,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        q_partials.stride(0), hq, hq // hkv, t, s, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    block_m, block_n, launch = _tiles(q.device, d, "dkdv")
    k_blocks = triton.cdiv(s, block_n)
    k_partials = torch.zeros(len(PARAM_NAMES), b, k_blocks, hq, device=q.device, dtype=torch.float32)
    _exposb_dkdv_kernel[(k_blocks, b * hq)](
        q, k, v, do, dk, dv, lse, di, cos, sin, *param_values, seq_lens, k_partials,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        k_partials.stride(0), hq, hq // hkv, t, s, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    if hq != hkv:
        dk = dk.view(b, s, hkv, hq // hkv, d).sum(3).to(k.dtype)
        dv = dv.view(b, s, hkv, hq // hkv, d).sum(3).to(v.dtype)
    return dq, dk, dv, q_partials.sum((1, 2)) + k_partials.sum((1, 2))


class _ExpoSBAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, seq_lens, *param_values):
        """Keeps O in float32 for the backward's D_m = rowsum(dO * O): from the rounded O, D_m's
        error is the same for every score of a row, and the parameter gradients, which sum over
        every score, add it up (1.4-3.6x torch's own fp16 error in five of the seven; < 0.7x
        with the float32 O, tests/kernels/test_exposb_kernel.py)."""
        params = dict(zip(PARAM_NAMES, param_values))
        o, lse = _forward(q, k, v, params, causal, seq_lens, torch.float32)
        ctx.save_for_backward(q, k, v, o, lse, *param_values)
        ctx.causal, ctx.seq_lens = causal, seq_lens
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *param_values = ctx.saved_tensors
        params = dict(zip(PARAM_NAMES, param_values))
        dq, dk, dv, d_params = _backward(q, k, v, o, lse, do, params, ctx.causal, ctx.seq_lens)
        return dq, dk, dv, None, None, *d_params.unbind(0)


def exposb_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lam: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    delta: torch.Tensor,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """ExpoSB attention (module docstring), differentiable in q, k, v and all seven parameters.

    q [B, T, Hq, D], k/v [B, S, Hkv, D] (S >= T, any strides), fp16/bf16/fp32; D a power of two in [32, 256].
    lam (> 0), alpha, beta, gamma, mu, sigma (> 0), delta (>= 0): the constrained values,
    float32 [Hq], one per query head (the layer maps its raw parameters to them).
    causal: query m sees keys n <= m; seq_lens [B]: keys n >= seq_lens[b] are padding
    (a query that sees no key gets zeros). Returns o [B, T, Hq, D] in q's dtype.
    """
    params = dict(lam=lam, alpha=alpha, beta=beta, gamma=gamma, mu=mu, sigma=sigma, delta=delta)
    _check(q, k, v, params)
    if seq_lens is not None:
        seq_lens = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    values = [params[name].to(device=q.device, dtype=torch.float32).contiguous() for name in PARAM_NAMES]
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *params.values()))):
        return _forward(q, k, v, dict(zip(PARAM_NAMES, values)), causal, seq_lens, q.dtype)[0]  # inference: O straight in q's dtype
    return _ExpoSBAttention.apply(q, k, v, causal, seq_lens, *values)
