"""ExpoSB's backward kernels (@triton.jit): dq (one program per query block and query head,
also d delta) and dk/dv (one per key block and query head), each writing its partial sums of
the seven parameter gradients. kernels/exposb.py has the math, exposb_launch.py the launchers."""

import triton
import triton.language as tl

from attnbench.kernels.exposb_tiles import (
    ABOVE, BELOW, DIAGONAL, LOG2E, distance_weight, head_params, input_grad, key_ranges, load_transformed,
    query_ranges, scores, store_rows, visible,
)


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
        k1, k2, _, _, _ = load_transformed(K, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, D // 2)
        k1 = k1.to(q1.dtype)
        k2 = k2.to(q1.dtype)
        v = tl.load(V + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd, mask=(pos_k < S)[:, None], other=0.0)
        w = distance_weight(pos_q, pos_k, pos_q0, delta, REGIME, BLOCK_M)
        s = scores(q1, q2, k1, k2, DOT_PRECISION) * w * sm_scale  # [BM, BN], finite
        p = tl.where(visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - di[:, None])
        dx = (ds * w * sm_scale).to(k1.dtype)
        dq1 += tl.dot(dx, k1, input_precision=DOT_PRECISION)
        dq2 += tl.dot(dx, k2, input_precision=DOT_PRECISION)
        distance = tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32)
        d_delta -= tl.sum(ds * s * distance, 1)
    return dq1, dq2, d_delta


@triton.jit
def exposb_dq_kernel(
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
    lam, alpha, gamma, mu, sigma, delta, f1, f2, band1, band2 = head_params(
        LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF
    )

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    cols = tl.arange(0, D)
    inside = rows < T
    q1, q2, _, _, _ = load_transformed(
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
    below_end, above_start, hi = key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
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
    _, _, y1, y2, r = load_transformed(
        Q + b * stride_qb + h * stride_qh, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, HALF
    )
    dx1, dx2 = input_grad(dq1, dq2, r, f1, f2, COS, SIN, pos_q, inside[:, None], HALF)
    store_rows(DQ + b * stride_dqb + h * stride_dqh, stride_dqt, stride_dqd, rows, inside[:, None], dx1, dx2, HALF)
    slot = (b * tl.num_programs(0) + pid_m) * H + h
    _store_param_partials(
        PARTIALS, slot, stride_param, dq1, dq2, y1, y2, r, pos_q, f1, f2, band1, band2, lam, alpha, gamma, mu, sigma, HALF
    )
    tl.store(PARTIALS + 6 * stride_param + slot, tl.sum(d_delta, 0))


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
        q1, q2, _, _, _ = load_transformed(Q, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, D // 2)
        q1 = q1.to(k1.dtype)
        q2 = q2.to(k1.dtype)
        do = tl.load(DO + rows[:, None] * stride_dot + cols[None, :] * stride_dod, mask=inside[:, None], other=0.0)
        lse = tl.load(LSE + rows, mask=inside, other=float("inf"))
        di = tl.load(DI + rows, mask=inside, other=0.0)
        w = distance_weight(pos_q, pos_k, m0 + shift, delta, REGIME, BLOCK_M)
        s = scores(q1, q2, k1, k2, DOT_PRECISION) * w * sm_scale  # [BM, BN]
        p = tl.where(visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), tl.exp2(s * LOG2E - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dx_t = tl.trans((p * (dp - di[:, None]) * w * sm_scale).to(k1.dtype))  # [BN, BM]
        dk1 += tl.dot(dx_t, q1, input_precision=DOT_PRECISION)
        dk2 += tl.dot(dx_t, q2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def exposb_dkdv_kernel(
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
    lam, alpha, gamma, mu, sigma, delta, f1, f2, band1, band2 = head_params(
        LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF
    )
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    # this head's k' and the values stay in registers for the whole loop
    k1, k2, _, _, _ = load_transformed(k_base, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, HALF)
    k1 = k1.to(K.dtype.element_ty)
    k2 = k2.to(K.dtype.element_ty)
    v_ptrs = V + b * stride_vb + (h // GROUP) * stride_vh + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=inside, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + (b * H + h) * T
    di_base = DI + (b * H + h) * T
    lo, above_end, below_start, hi = query_ranges(n0, kv_len, T, shift, CAUSAL, BLOCK_M, BLOCK_N)

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
    _, _, y1, y2, r = load_transformed(k_base, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, HALF)
    dx1, dx2 = input_grad(g1, g2, r, f1, f2, COS, SIN, pos_k, inside, HALF)
    store_rows(DK + b * stride_dkb + h * stride_dkh, stride_dkt, stride_dkd, pos_k, inside, dx1, dx2, HALF)
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + pos_k[:, None] * stride_dvt + cols[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=inside)
    slot = (b * tl.num_programs(0) + pid_n) * H + h
    _store_param_partials(
        PARTIALS, slot, stride_param, g1, g2, y1, y2, r, pos_k, f1, f2, band1, band2, lam, alpha, gamma, mu, sigma, HALF
    )
