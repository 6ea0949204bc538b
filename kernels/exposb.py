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
Off the diagonal, the distance splits at a pivot p between the query and key blocks,
|m - n| = |m - p| + |p - n|, so the decay tile is an outer product of BLOCK_M + BLOCK_N
exponentials (a multiply per score, no extra exp); only tiles that straddle the diagonal
pay one exp per score.

Backward (FA2): D_m = rowsum(dO_m * O_m); P recomputed from the LSE;
    dP = dO V^T,   dS = P * (dP - D_m)                   (dL/ds)
    dV = P^T dO
    dX = dS * w / sqrt(D)                                (dL/d(q'.k'), through the decay)
    dq' = dX k',   dk' = dX^T q'                         (dk' per query head of a kv head)
    d delta = sum_mn dS_mn * s_mn * (-|m - n|)
Through q' = f * r * R q (per row, in the kernels' epilogues; the same for k with n):
    dq_m       = r_m * R_m^T (f * dq'_m)                  (R^T: x1 = g1 c + g2 s, x2 = g2 c - g1 s)
    dr_m       = sum_j dq'_mj * f_j * (R_m q_m)_j
    d alpha    = sum_m dr_m * exp(-lam m),   d lam = sum_m dr_m * alpha * exp(-lam m) * (-m)
    df_j       = sum_m dq'_mj * r_m * (R_m q_m)_j
    d beta     = sum_j df_j,                 d gamma = sum_j df_j * band_j
    d mu       = sum_j df_j * gamma * band_j * (j - mu) / sigma^2
    d sigma    = sum_j df_j * gamma * band_j * (j - mu)^2 / sigma^3
Every program writes its partial sums of the seven parameter gradients to a small
[7, B, blocks, Hq] buffer; torch sums it (a cheap epilogue).

Kernels: dq (one program per query block and query head, also d delta) and dk/dv (one
program per key block and kv head, looping over the query heads of its group, since each
needs its own k').
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnbench.kernels.reference import rope_angles

ROPE_BASE = 10000.0
PARAM_NAMES = ("lam", "alpha", "beta", "gamma", "mu", "sigma", "delta")
LOG2E = 1.4426950408889634

# tile regimes, by where the key tile lies relative to the query tile
BELOW = tl.constexpr(0)  # every key n <= every query position m
DIAGONAL = tl.constexpr(1)  # the tile straddles the diagonal
ABOVE = tl.constexpr(2)  # every key n > every query position m


@triton.jit
def _channel_filter(beta, gamma, mu, sigma, D: tl.constexpr):
    """f [D] and band [D] of one head."""
    j = tl.arange(0, D).to(tl.float32)
    band = tl.exp(-(j - mu) * (j - mu) / (2.0 * sigma * sigma))
    return beta + gamma * band, band


@triton.jit
def _load_transformed(ptr, stride_row, stride_col, rows, pos, n_rows, COS, SIN, lam, alpha, filt, D: tl.constexpr):
    """Rows ``rows`` [R] (at positions ``pos`` [R]) of a [n_rows, D] slice at ``ptr``, transformed:
    returns x' = f * r * R x [R, D] fp32, R x [R, D] fp32 and r [R]. Rows >= n_rows read as zeros.

    The rotation reads each row twice, once at the partner columns (j + D/2) % D, so no
    register shuffle is needed; the second read hits cache.
    """
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, D)
    partner = (cols + HALF) % D
    sign = tl.where(cols < HALF, -1.0, 1.0)
    inside = (rows < n_rows)[:, None]
    x = tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=inside, other=0.0)
    xp = tl.load(ptr + rows[:, None] * stride_row + partner[None, :] * stride_col, mask=inside, other=0.0)
    angle = pos[:, None] * HALF + (cols % HALF)[None, :]  # cos/sin tables are [S, D/2]
    c = tl.load(COS + angle, mask=inside, other=0.0)
    s = tl.load(SIN + angle, mask=inside, other=0.0)
    rotated = x.to(tl.float32) * c + sign[None, :] * xp.to(tl.float32) * s
    r = 1.0 + alpha * tl.exp2(-lam * LOG2E * pos.to(tl.float32))
    return rotated * r[:, None] * filt[None, :], rotated, r


@triton.jit
def _unrotate(g, pos, n_rows, rows, COS, SIN, R: tl.constexpr, D: tl.constexpr):
    """R_p^T g for g [R, D] fp32 (the transposed rotation, for gradients), by a register shuffle."""
    HALF: tl.constexpr = D // 2
    half = tl.arange(0, HALF)
    inside = (rows < n_rows)[:, None]
    c = tl.load(COS + pos[:, None] * HALF + half[None, :], mask=inside, other=0.0)
    s = tl.load(SIN + pos[:, None] * HALF + half[None, :], mask=inside, other=0.0)
    g1, g2 = tl.split(tl.permute(tl.reshape(g, (R, 2, HALF)), (0, 2, 1)))
    return tl.reshape(tl.permute(tl.join(g1 * c + g2 * s, g2 * c - g1 * s), (0, 2, 1)), (R, D))


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
    acc, l_i, m_i, q_dot, pos_q, pos_q0, lo, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd, S, kv_len,
    COS, SIN, lam, alpha, filt, delta, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) of one regime (base 2: exp2 and log2 units)."""
    cols = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        pos_k = n0 + tl.arange(0, BLOCK_N)
        k_prime, _, _ = _load_transformed(K, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, filt, D)
        v = tl.load(V + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd, mask=(pos_k < S)[:, None], other=0.0)
        qk = tl.dot(q_dot, tl.trans(k_prime.to(q_dot.dtype)), input_precision=DOT_PRECISION)  # [BM, BN]
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
    lam, alpha, delta = tl.load(LAM + h), tl.load(ALPHA + h), tl.load(DELTA + h)
    filt, _ = _channel_filter(tl.load(BETA + h), tl.load(GAMMA + h), tl.load(MU + h), tl.load(SIGMA + h), D)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    q_base = Q + b * stride_qb + h * stride_qh
    # q' stays in registers for the whole loop
    q_prime, _, _ = _load_transformed(q_base, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, filt, D)
    q_dot = q_prime.to(Q.dtype.element_ty)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    below_end, above_start, hi = _key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q_dot, pos_q, pos_q0, 0, below_end, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        S, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale, BELOW, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q_dot, pos_q, pos_q0, below_end, above_start, k_base, v_base, stride_kt, stride_kd, stride_vt,
        stride_vd, S, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale, DIAGONAL, CAUSAL, D, BLOCK_M, BLOCK_N,
        DOT_PRECISION,
    )
    if not CAUSAL:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q_dot, pos_q, pos_q0, above_start, hi, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, S, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale, ABOVE, CAUSAL, D, BLOCK_M, BLOCK_N,
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
def _store_param_partials(
    PARTIALS, slot, stride_param, g, rotated, r, pos, filt, band, lam, alpha, gamma, mu, sigma, D: tl.constexpr
):
    """Partial sums of d lam, d alpha, d beta, d gamma, d mu, d sigma from the rows of one tile.

    g = dL/dx' [R, D], rotated = R x [R, D], r [R] at positions pos [R] (module docstring).
    Rows outside the sequence have g = 0 or rotated = 0, so they add nothing.
    """
    dr = tl.sum(g * rotated * filt[None, :], 1)  # [R]
    decay = tl.exp2(-lam * LOG2E * pos.to(tl.float32))
    d_alpha = tl.sum(dr * decay, 0)
    d_lam = tl.sum(dr * alpha * decay * -pos.to(tl.float32), 0)
    d_filt = tl.sum(g * rotated * r[:, None], 0)  # [D]
    j = tl.arange(0, D).to(tl.float32)
    d_band = d_filt * gamma * band  # df_j * d f_j / d(band exponent)
    tl.store(PARTIALS + 0 * stride_param + slot, d_lam)
    tl.store(PARTIALS + 1 * stride_param + slot, d_alpha)
    tl.store(PARTIALS + 2 * stride_param + slot, tl.sum(d_filt, 0))
    tl.store(PARTIALS + 3 * stride_param + slot, tl.sum(d_filt * band, 0))
    tl.store(PARTIALS + 4 * stride_param + slot, tl.sum(d_band * (j - mu), 0) / (sigma * sigma))
    tl.store(PARTIALS + 5 * stride_param + slot, tl.sum(d_band * (j - mu) * (j - mu), 0) / (sigma * sigma * sigma))


@triton.jit
def _dq_tiles(
    dq_prime, d_delta, q_dot, do, lse, di, pos_q, pos_q0, lo, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
    S, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq' += dX k' and the rows' d delta over the key tiles [lo, hi) of one regime."""
    cols = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        pos_k = n0 + tl.arange(0, BLOCK_N)
        k_prime, _, _ = _load_transformed(K, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, filt, D)
        k_dot = k_prime.to(q_dot.dtype)
        v = tl.load(V + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd, mask=(pos_k < S)[:, None], other=0.0)
        w = _distance_weight(pos_q, pos_k, pos_q0, delta, REGIME, BLOCK_M)
        s = tl.dot(q_dot, tl.trans(k_dot), input_precision=DOT_PRECISION) * w * sm_scale  # [BM, BN], finite
        p = tl.where(_visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - di[:, None])
        dq_prime += tl.dot((ds * w * sm_scale).to(k_dot.dtype), k_dot, input_precision=DOT_PRECISION)
        distance = tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        d_delta -= tl.sum(ds * s * distance, 1)
    return dq_prime, d_delta


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
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    lam, alpha, delta = tl.load(LAM + h), tl.load(ALPHA + h), tl.load(DELTA + h)
    gamma, mu, sigma = tl.load(GAMMA + h), tl.load(MU + h), tl.load(SIGMA + h)
    filt, band = _channel_filter(tl.load(BETA + h), gamma, mu, sigma, D)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    cols = tl.arange(0, D)
    inside = rows < T
    q_prime, q_rotated, q_r = _load_transformed(
        Q + b * stride_qb + h * stride_qh, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, filt, D
    )
    q_dot = q_prime.to(Q.dtype.element_ty)
    do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + cols[None, :] * stride_dod
    do = tl.load(do_ptrs, mask=inside[:, None], other=0.0)
    lse = tl.load(LSE + (b * H + h) * T + rows, mask=inside, other=float("inf"))
    di = tl.load(DI + (b * H + h) * T + rows, mask=inside, other=0.0)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh

    dq_prime = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    d_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    below_end, above_start, hi = _key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    dq_prime, d_delta = _dq_tiles(
        dq_prime, d_delta, q_dot, do, lse, di, pos_q, pos_q0, 0, below_end, k_base, v_base, stride_kt, stride_kd,
        stride_vt, stride_vd, S, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale, BELOW, CAUSAL, D, BLOCK_M,
        BLOCK_N, DOT_PRECISION,
    )
    dq_prime, d_delta = _dq_tiles(
        dq_prime, d_delta, q_dot, do, lse, di, pos_q, pos_q0, below_end, above_start, k_base, v_base, stride_kt,
        stride_kd, stride_vt, stride_vd, S, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale, DIAGONAL, CAUSAL, D,
        BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    if not CAUSAL:
        dq_prime, d_delta = _dq_tiles(
            dq_prime, d_delta, q_dot, do, lse, di, pos_q, pos_q0, above_start, hi, k_base, v_base, stride_kt,
            stride_kd, stride_vt, stride_vd, S, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale, ABOVE, CAUSAL, D,
            BLOCK_M, BLOCK_N, DOT_PRECISION,
        )

    dq = q_r[:, None] * _unrotate(filt[None, :] * dq_prime, pos_q, T, rows, COS, SIN, BLOCK_M, D)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + cols[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=inside[:, None])
    slot = (b * tl.num_programs(0) + pid_m) * H + h
    _store_param_partials(
        PARTIALS, slot, stride_param, dq_prime, q_rotated, q_r, pos_q, filt, band, lam, alpha, gamma, mu, sigma, D
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
    dk_prime, dv, k_dot, v, pos_k, lo, hi, Q, DO, LSE, DI, stride_qt, stride_qd, stride_dot, stride_dod,
    T, shift, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk' += dX^T q' and dv += P^T dO over the query tiles [lo, hi) of one regime, one query head."""
    cols = tl.arange(0, D)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        pos_q = rows + shift
        inside = rows < T
        q_prime, _, _ = _load_transformed(Q, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, filt, D)
        q_dot = q_prime.to(k_dot.dtype)
        do = tl.load(DO + rows[:, None] * stride_dot + cols[None, :] * stride_dod, mask=inside[:, None], other=0.0)
        lse = tl.load(LSE + rows, mask=inside, other=float("inf"))
        di = tl.load(DI + rows, mask=inside, other=0.0)
        w = _distance_weight(pos_q, pos_k, m0 + shift, delta, REGIME, BLOCK_M)
        s = tl.dot(q_dot, tl.trans(k_dot), input_precision=DOT_PRECISION) * w * sm_scale  # [BM, BN]
        p = tl.where(_visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - di[:, None])
        dk_prime += tl.dot(tl.trans((ds * w * sm_scale).to(q_dot.dtype)), q_dot, input_precision=DOT_PRECISION)
    return dk_prime, dv


@triton.jit
def _exposb_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, SEQ_LENS, PARTIALS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_param, H, HKV, GROUP, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dk, dv of BLOCK_N keys of one (batch, kv head), summed over the GROUP query
    heads that read them; the k side's parameter partials per query head in
    PARTIALS [7, B, cdiv(S, BLOCK_N), Hq]."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // HKV
    hk = tl.program_id(1) % HKV
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    shift = S - T
    n0 = pid_n * BLOCK_N
    pos_k = n0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    inside = (pos_k < S)[:, None]
    k_base = K + b * stride_kb + hk * stride_kh
    v = tl.load(V + b * stride_vb + hk * stride_vh + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd,
                mask=inside, other=0.0)
    lo, above_end, below_start, hi = _query_ranges(n0, kv_len, T, shift, CAUSAL, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        lam, alpha, delta = tl.load(LAM + h), tl.load(ALPHA + h), tl.load(DELTA + h)
        gamma, mu, sigma = tl.load(GAMMA + h), tl.load(MU + h), tl.load(SIGMA + h)
        filt, band = _channel_filter(tl.load(BETA + h), gamma, mu, sigma, D)
        # this query head's k' stays in registers for its whole loop
        k_prime, k_rotated, k_r = _load_transformed(
            k_base, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, filt, D
        )
        k_dot = k_prime.to(K.dtype.element_ty)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * T
        di_base = DI + (b * H + h) * T
        dk_prime = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dk_prime, dv = _dkdv_tiles(
            dk_prime, dv, k_dot, v, pos_k, lo, above_end, q_base, do_base, lse_base, di_base, stride_qt, stride_qd,
            stride_dot, stride_dod, T, shift, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale, ABOVE, CAUSAL, D,
            BLOCK_M, DOT_PRECISION,
        )
        dk_prime, dv = _dkdv_tiles(
            dk_prime, dv, k_dot, v, pos_k, above_end, below_start, q_base, do_base, lse_base, di_base, stride_qt,
            stride_qd, stride_dot, stride_dod, T, shift, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale,
            DIAGONAL, CAUSAL, D, BLOCK_M, DOT_PRECISION,
        )
        dk_prime, dv = _dkdv_tiles(
            dk_prime, dv, k_dot, v, pos_k, below_start, hi, q_base, do_base, lse_base, di_base, stride_qt,
            stride_qd, stride_dot, stride_dod, T, shift, kv_len, COS, SIN, lam, alpha, filt, delta, sm_scale,
            BELOW, CAUSAL, D, BLOCK_M, DOT_PRECISION,
        )
        dk += k_r[:, None] * _unrotate(filt[None, :] * dk_prime, pos_k, S, pos_k, COS, SIN, BLOCK_N, D)
        slot = (b * tl.num_programs(0) + pid_n) * H + h
        _store_param_partials(
            PARTIALS, slot, stride_param, dk_prime, k_rotated, k_r, pos_k, filt, band, lam, alpha, gamma, mu, sigma, D
        )

    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + pos_k[:, None] * stride_dkt + cols[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + pos_k[:, None] * stride_dvt + cols[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=inside)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=inside)


def _blocks(device: torch.device) -> dict[str, tuple[int, int]]:
    """(BLOCK_M, BLOCK_N) per kernel. Under the CPU interpreter small tiles, so tests at T <= 64
    cover every regime (below, diagonal, above) with several tiles each."""
    if device.type != "cuda":
        return {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)}
    return {"fwd": (128, 64), "dq": (64, 32), "dkdv": (32, 64)}


def _launch_options(device: torch.device, head_dim: int) -> dict:
    if device.type != "cuda":
        return {}
    return {"num_warps": 8 if head_dim >= 128 else 4, "num_stages": 2}


@functools.lru_cache(maxsize=16)
def _angle_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [S, D/2] of the RoPE angles (the reference's own tables)."""
    return tuple(t.contiguous() for t in rope_angles(torch.arange(length, device=device), head_dim, ROPE_BASE))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"exposb: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit [B, T, Hq, D], [B, S, Hkv, D]")
    if d < 16 or d & (d - 1):
        raise ValueError(f"exposb triton kernel needs head_dim a power of two >= 16, not {d}")
    if k.shape[1] < t:
        raise ValueError("exposb triton kernel needs S >= T (queries are the last T positions)")
    for name, value in params.items():
        if value.shape != (hq,):
            raise ValueError(f"exposb: {name} must have shape [{hq}] (one value per query head), not {tuple(value.shape)}")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


def _forward(q, k, v, params, causal, seq_lens):
    """o [B, T, Hq, D] (dtype of q) and the LSE [B, Hq, T] float32 in log2 units."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(b, hq, t, device=q.device, dtype=torch.float32)
    cos, sin = _angle_tables(s, d, q.device)
    block_m, block_n = _blocks(q.device)["fwd"]
    grid = (triton.cdiv(t, block_m), b * hq)
    _exposb_fwd_kernel[grid](
        q, k, v, o, lse, cos, sin, *(params[name] for name in PARAM_NAMES), seq_lens,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        hq, hq // hkv, t, s, d**-0.5,
        HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), **_launch_options(q.device, d),
    )
    return o, lse


def _backward(q, k, v, o, lse, do, params, causal, seq_lens):
    """dq, dk, dv (dtypes of q, k, v) and the parameter gradients float32 [7, Hq] (PARAM_NAMES order)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    di = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # D_m = rowsum(dO * O): [B, Hq, T]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cos, sin = _angle_tables(s, d, q.device)
    blocks = _blocks(q.device)
    common = dict(HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, DOT_PRECISION=_dot_precision(q.dtype))
    launch = _launch_options(q.device, d)
    param_values = [params[name] for name in PARAM_NAMES]

    block_m, block_n = blocks["dq"]
    q_blocks = triton.cdiv(t, block_m)
    q_partials = torch.zeros(len(PARAM_NAMES), b, q_blocks, hq, device=q.device, dtype=torch.float32)
    _exposb_dq_kernel[(q_blocks, b * hq)](
        q, k, v, do, dq, lse, di, cos, sin, *param_values, seq_lens, q_partials,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        q_partials.stride(0), hq, hq // hkv, t, s, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    block_m, block_n = blocks["dkdv"]
    k_blocks = triton.cdiv(s, block_n)
    k_partials = torch.zeros(len(PARAM_NAMES), b, k_blocks, hq, device=q.device, dtype=torch.float32)
    _exposb_dkdv_kernel[(k_blocks, b * hkv)](
        q, k, v, do, dk, dv, lse, di, cos, sin, *param_values, seq_lens, k_partials,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        k_partials.stride(0), hq, hkv, hq // hkv, t, s, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    return dq, dk, dv, q_partials.sum((1, 2)) + k_partials.sum((1, 2))


class _ExpoSBAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, seq_lens, *param_values):
        params = dict(zip(PARAM_NAMES, param_values))
        o, lse = _forward(q, k, v, params, causal, seq_lens)
        ctx.save_for_backward(q, k, v, o, lse, *param_values)
        ctx.causal, ctx.seq_lens = causal, seq_lens
        return o

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

    q [B, T, Hq, D], k/v [B, S, Hkv, D] (S >= T, any strides), fp16/bf16/fp32; D a power of two >= 16.
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
    return _ExpoSBAttention.apply(q, k, v, causal, seq_lens, *values)
