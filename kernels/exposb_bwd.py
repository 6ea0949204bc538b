"""ExpoSB's backward kernels (@triton.jit): dq (one program per query block and query head,
also d delta) and dk/dv (one per key block and kv head, summing its query heads' shares). Their
loops read q' as the forward wrote it and k' as the prepass (exposb_prepass.py) did, and accumulate
dq', dk' in float32; the epilogues turn
those back into dq, dk (once per row, from the raw q or k) and write partial sums of the seven
parameter gradients. kernels/exposb.py has the math, exposb_launch.py the launchers."""

import triton
import triton.language as tl

from attnbench.kernels.exposb_tiles import (
    ABOVE, BELOW, DIAGONAL, LOG2E, halves, head_params, input_grad, key_block_pivot, key_ranges, load_tile,
    load_transformed, owner_factor, pivot_distance, query_block_pivot, query_ranges, store_rows, tile_weight, visible,
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
    dq, y_sum, y_dist, q, do, lse, di, pos_q, row_factor_log2, pivot, lo, hi, K, V, stride_kt, stride_kd, stride_vt,
    stride_vd, S, kv_len, rate, sm_scale,
    REGIME: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Over the key tiles [lo, hi) of one regime, with a = the regime's query factor
    (exposb_tiles.owner_factor; 1 on the diagonal) and t = s / a = q'.k' * tile_weight:
    dq += (dS * tile_weight) k' (that is dX k' / a), and the row sums d delta needs of
    x = dS * t (X / a with X = dS * s): off the diagonal y_sum += rowsum(x) and
    y_dist += rowsum(x * |p - n|) (the caller adds |m - p| * y_sum: no distance per score);
    on the diagonal y_dist += rowsum(x * |m - n|). MASKED: test each score (visible)."""
    for n0 in range(lo, hi, BLOCK_N):
        pos_k = n0 + tl.arange(0, BLOCK_N)
        k = load_tile(K, stride_kt, stride_kd, pos_k, S, D)
        v = load_tile(V, stride_vt, stride_vd, pos_k, S, D)
        w = tile_weight(pos_q, pos_k, pivot, rate, sm_scale, REGIME)  # [BM, BN] on the diagonal, else [1, BN]
        t = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * w  # [BM, BN], finite
        p = tl.exp2(t * row_factor_log2[:, None] - lse[:, None])
        if MASKED:
            p = tl.where(visible(pos_q[:, None], pos_k[None, :], kv_len, REGIME, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - di[:, None])
        dq = tl.dot((ds * w).to(k.dtype), k, acc=dq, input_precision=DOT_PRECISION)
        x = ds * t
        if REGIME == DIAGONAL:
            y_dist += tl.sum(x * tl.abs(pos_q[:, None] - pos_k[None, :]).to(tl.float32), 1)
        else:
            y_sum += tl.sum(x, 1)
            y_dist += tl.sum(x * pivot_distance(pos_k, pivot)[None, :], 1)
    return dq, y_sum, y_dist


@triton.jit
def _dq_regime(
    dq, d_delta, q, do, lse, di, pos_q, pos_q0, lo, full_end, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
    S, kv_len, rate, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq' and the rows' d delta [BM] with the key tiles [lo, hi) of one regime added: [lo, full_end)
    unmasked (none on the diagonal), [full_end, hi) masked. Off the diagonal the tiles' sums are
    per unit query factor a [BM], formed once here: dq' += a * sum (dS * b) k', and with
    |m - n| = |m - p| + |p - n|, d delta_m -= a_m (|m - p| y_sum_m + y_dist_m) (_dq_tiles)."""
    pivot = query_block_pivot(pos_q0, REGIME, BLOCK_M)
    row_factor = owner_factor(pos_q, pivot, rate, sm_scale, REGIME)  # [BM]
    y_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    y_dist = tl.zeros([BLOCK_M], dtype=tl.float32)
    if REGIME == DIAGONAL:  # the weight is whole per score: straight onto dq'
        acc = dq
    else:
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        acc, y_sum, y_dist = _dq_tiles(
            acc, y_sum, y_dist, q, do, lse, di, pos_q, row_factor * LOG2E, pivot, lo, full_end, K, V, stride_kt,
            stride_kd, stride_vt, stride_vd, S, kv_len, rate, sm_scale, REGIME, False, CAUSAL, D, BLOCK_N, DOT_PRECISION,
        )
    acc, y_sum, y_dist = _dq_tiles(
        acc, y_sum, y_dist, q, do, lse, di, pos_q, row_factor * LOG2E, pivot, full_end, hi, K, V, stride_kt,
        stride_kd, stride_vt, stride_vd, S, kv_len, rate, sm_scale, REGIME, True, CAUSAL, D, BLOCK_N, DOT_PRECISION,
    )
    if REGIME == DIAGONAL:
        dq = acc
        d_delta -= y_dist
    else:
        dq += row_factor[:, None] * acc
        d_delta -= row_factor * (pivot_distance(pos_q, pivot) * y_sum + y_dist)
    return dq, d_delta


@triton.jit
def exposb_dq_kernel(
    Q, QT, KT, V, O, DO, DQ, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, SEQ_LENS, PARTIALS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_tb, stride_tt, stride_th, stride_td,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_param, H, GROUP, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dq of BLOCK_M query rows of one (batch, query head), with the q side's and
    d delta's parameter partials in PARTIALS [7, B, cdiv(T, BLOCK_M), Hq]; also stores its rows'
    D_m = rowsum(dO * O) in DI [B, Hq, T] for the dk/dv kernel (O float32 [B, T, Hq, D]). Q: the raw q
    (for the epilogue), QT = q' [B, T, Hq, D] (strides stride_t*), KT = k' [B, S, Hq, D], V [B, S, Hkv, D]."""
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
    rate = delta * LOG2E  # the decay per position, in exp2's units

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    inside = rows < T
    # q' and dO stay in registers for the whole loop
    q = load_tile(QT + b * stride_tb + h * stride_th, stride_tt, stride_td, rows, T, D)
    do = load_tile(DO + b * stride_dob + h * stride_doh, stride_dot, stride_dod, rows, T, D)
    lse = tl.load(LSE + (b * H + h) * T + rows, mask=inside, other=float("inf"))
    o = load_tile(O + b * stride_ob + h * stride_oh, stride_ot, stride_od, rows, T, D)
    di = tl.sum(do.to(tl.float32) * o, 1)  # rows past T: 0
    tl.store(DI + (b * H + h) * T + rows, di, mask=inside)
    k_base = KT + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh

    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)  # dq' of these rows
    d_delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    below_full, below_end, above_start, above_full, hi = key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    dq, d_delta = _dq_regime(
        dq, d_delta, q, do, lse, di, pos_q, pos_q0, 0, below_full, below_end, k_base, v_base, stride_kt, stride_kd,
        stride_vt, stride_vd, S, kv_len, rate, sm_scale, BELOW, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    dq, d_delta = _dq_regime(
        dq, d_delta, q, do, lse, di, pos_q, pos_q0, below_end, below_end, above_start, k_base, v_base, stride_kt,
        stride_kd, stride_vt, stride_vd, S, kv_len, rate, sm_scale, DIAGONAL, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    if not CAUSAL:
        dq, d_delta = _dq_regime(
            dq, d_delta, q, do, lse, di, pos_q, pos_q0, above_start, above_full, hi, k_base, v_base, stride_kt,
            stride_kd, stride_vt, stride_vd, S, kv_len, rate, sm_scale, ABOVE, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )

    # epilogue, once per row: R q and r of the raw q in float32 (the parameter gradients need them)
    g1, g2 = halves(dq, BLOCK_M, D)
    _, _, y1, y2, r = load_transformed(
        Q + b * stride_qb + h * stride_qh, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, HALF
    )
    dx1, dx2 = input_grad(g1, g2, r, f1, f2, COS, SIN, pos_q, inside[:, None], HALF)
    store_rows(DQ + b * stride_dqb + h * stride_dqh, stride_dqt, stride_dqd, rows, inside[:, None], dx1, dx2, HALF)
    slot = (b * tl.num_programs(0) + pid_m) * H + h
    _store_param_partials(
        PARTIALS, slot, stride_param, g1, g2, y1, y2, r, pos_q, f1, f2, band1, band2, lam, alpha, gamma, mu, sigma, HALF
    )
    tl.store(PARTIALS + 6 * stride_param + slot, tl.sum(d_delta, 0))


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, pos_k, row_factor_log2, pivot, lo, hi, Q, DO, LSE, DI, stride_qt, stride_qd, stride_dot, stride_dod,
    T, shift, kv_len, rate, sm_scale,
    REGIME: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Over the query tiles [lo, hi) of one regime, one query head, with b = the regime's key factor
    (exposb_tiles.owner_factor; 1 on the diagonal): dk += (dS * tile_weight)^T q' (dX^T q' / b) and
    dv += P^T dO. Scores are kept transposed ([keys, queries]) so dk' and dv come out without a
    transpose. Rows past T read q' = dO = 0 and lse = +inf, so they add nothing. MASKED: test each
    score (visible)."""
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        pos_q = rows + shift
        inside = rows < T
        q = load_tile(Q, stride_qt, stride_qd, rows, T, D)
        do = load_tile(DO, stride_dot, stride_dod, rows, T, D)
        lse = tl.load(LSE + rows, mask=inside, other=float("inf"))
        di = tl.load(DI + rows, mask=inside, other=0.0)
        w_t = tile_weight(pos_k, pos_q, pivot, rate, sm_scale, REGIME)  # [BN, BM] on the diagonal, else [1, BM]
        t_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * w_t  # s^T / b
        p_t = tl.exp2(t_t * row_factor_log2[:, None] - lse[None, :])
        if MASKED:
            p_t = tl.where(visible(pos_q[None, :], pos_k[:, None], kv_len, REGIME, CAUSAL), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, acc=dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dx_t = (p_t * (dp_t - di[None, :]) * w_t).to(q.dtype)
        dk = tl.dot(dx_t, q, acc=dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_regime(
    dk, dv, k, v, pos_k, n0, lo, full_end, hi, Q, DO, LSE, DI, stride_qt, stride_qd, stride_dot, stride_dod,
    T, shift, kv_len, rate, sm_scale,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dk', dv with the query tiles [lo, hi) of one regime added: [lo, full_end) unmasked (none on the
    diagonal), [full_end, hi) masked. Off the diagonal dk' += b * (the tiles' sum), b [BN] the
    regime's key factor, formed once here."""
    pivot = key_block_pivot(n0, REGIME, BLOCK_N)
    key_factor = owner_factor(pos_k, pivot, rate, sm_scale, REGIME)  # [BN]
    if REGIME == DIAGONAL:  # the weight is whole per score: straight onto dk'
        acc = dk
    else:
        acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        acc, dv = _dkdv_tiles(
            acc, dv, k, v, pos_k, key_factor * LOG2E, pivot, lo, full_end, Q, DO, LSE, DI, stride_qt, stride_qd,
            stride_dot, stride_dod, T, shift, kv_len, rate, sm_scale, REGIME, False, CAUSAL, D, BLOCK_M, DOT_PRECISION,
        )
    acc, dv = _dkdv_tiles(
        acc, dv, k, v, pos_k, key_factor * LOG2E, pivot, full_end, hi, Q, DO, LSE, DI, stride_qt, stride_qd,
        stride_dot, stride_dod, T, shift, kv_len, rate, sm_scale, REGIME, True, CAUSAL, D, BLOCK_M, DOT_PRECISION,
    )
    if REGIME == DIAGONAL:
        dk = acc
    else:
        dk += key_factor[:, None] * acc
    return dk, dv


@triton.jit
def _dkdv_head(
    dv, v, K, QT, KT, DO, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, PARTIALS,
    b, h, kv_h, pid_n, n0, pos_k, inside, kv_len,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_tb, stride_tt, stride_th, stride_td,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_param, H, T, S, sm_scale,
    CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Query head h's share of BLOCK_N keys' gradients: dv + P^T dO, and dk (the raw k's, two halves
    [BN, D/2] float32) from this head's dk'; writes its parameter partials."""
    HALF: tl.constexpr = D // 2
    shift = S - T
    lam, alpha, gamma, mu, sigma, delta, f1, f2, band1, band2 = head_params(
        LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF
    )
    rate = delta * LOG2E  # the decay per position, in exp2's units
    k = load_tile(KT + b * stride_tb + h * stride_th, stride_tt, stride_td, pos_k, S, D)  # this head's k', for the loop
    q_base = QT + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + (b * H + h) * T
    di_base = DI + (b * H + h) * T
    lo, above_full, above_end, below_start, below_full, hi = query_ranges(n0, kv_len, T, shift, CAUSAL, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)  # dk' of this head
    # BELOW first: causal, its key factor then scales a dk' that holds nothing else yet
    dk, dv = _dkdv_regime(
        dk, dv, k, v, pos_k, n0, below_start, below_full, hi, q_base, do_base, lse_base, di_base, stride_qt,
        stride_qd, stride_dot, stride_dod, T, shift, kv_len, rate, sm_scale, BELOW, CAUSAL, D, BLOCK_M, BLOCK_N,
        DOT_PRECISION,
    )
    dk, dv = _dkdv_regime(
        dk, dv, k, v, pos_k, n0, above_end, above_end, below_start, q_base, do_base, lse_base, di_base, stride_qt,
        stride_qd, stride_dot, stride_dod, T, shift, kv_len, rate, sm_scale, DIAGONAL, CAUSAL, D, BLOCK_M, BLOCK_N,
        DOT_PRECISION,
    )
    if not CAUSAL:
        dk, dv = _dkdv_regime(
            dk, dv, k, v, pos_k, n0, lo, above_full, above_end, q_base, do_base, lse_base, di_base, stride_qt,
            stride_qd, stride_dot, stride_dod, T, shift, kv_len, rate, sm_scale, ABOVE, CAUSAL, D, BLOCK_M, BLOCK_N,
            DOT_PRECISION,
        )

    # epilogue, once per row: R k and r of the raw k in float32 (the parameter gradients need them)
    g1, g2 = halves(dk, BLOCK_N, D)
    k_base = K + b * stride_kb + kv_h * stride_kh
    _, _, y1, y2, r = load_transformed(k_base, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, HALF)
    dx1, dx2 = input_grad(g1, g2, r, f1, f2, COS, SIN, pos_k, inside, HALF)
    slot = (b * tl.num_programs(0) + pid_n) * H + h
    _store_param_partials(
        PARTIALS, slot, stride_param, g1, g2, y1, y2, r, pos_k, f1, f2, band1, band2, lam, alpha, gamma, mu, sigma, HALF
    )
    return dx1, dx2, dv


@triton.jit
def exposb_dkdv_kernel(
    K, QT, KT, V, DO, DK, DV, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, SEQ_LENS, PARTIALS,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_tb, stride_tt, stride_th, stride_td,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    stride_param, H, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dk, dv of BLOCK_N keys of one (batch, kv head), summed over the GROUP query
    heads that share it (each has its own k' and P: dk' is per head, its epilogue's dk and dv add
    up), DK, DV [B, S, Hkv, D]; the k side's parameter partials in PARTIALS [7, B, cdiv(S, BLOCK_N), Hq].
    K: the raw k [B, S, Hkv, D] (for the epilogues), QT = q' [B, T, Hq, D], KT = k' [B, S, Hq, D]
    (strides stride_t*), V [B, S, Hkv, D]. H: query heads."""
    HALF: tl.constexpr = D // 2
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // (H // GROUP)
    kv_h = tl.program_id(1) % (H // GROUP)
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    n0 = pid_n * BLOCK_N
    pos_k = n0 + tl.arange(0, BLOCK_N)
    inside = (pos_k < S)[:, None]
    v = load_tile(V + b * stride_vb + kv_h * stride_vh, stride_vt, stride_vd, pos_k, S, D)  # in registers throughout
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    if GROUP == 1:  # no group sum: dk straight from the one head, no third [BN, D] accumulator through the loops
        dk1, dk2, dv = _dkdv_head(
            dv, v, K, QT, KT, DO, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, PARTIALS,
            b, kv_h, kv_h, pid_n, n0, pos_k, inside, kv_len, stride_kb, stride_kt, stride_kh, stride_kd,
            stride_qb, stride_qt, stride_qh, stride_qd, stride_tb, stride_tt, stride_th, stride_td,
            stride_dob, stride_dot, stride_doh, stride_dod, stride_param, H, T, S, sm_scale,
            CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )
    else:
        dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        for g in range(GROUP):
            dx1, dx2, dv = _dkdv_head(
                dv, v, K, QT, KT, DO, LSE, DI, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, PARTIALS,
                b, kv_h * GROUP + g, kv_h, pid_n, n0, pos_k, inside, kv_len, stride_kb, stride_kt, stride_kh, stride_kd,
                stride_qb, stride_qt, stride_qh, stride_qd, stride_tb, stride_tt, stride_th, stride_td,
                stride_dob, stride_dot, stride_doh, stride_dod, stride_param, H, T, S, sm_scale,
                CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
            )
            dk1 += dx1
            dk2 += dx2
    store_rows(DK + b * stride_dkb + kv_h * stride_dkh, stride_dkt, stride_dkd, pos_k, inside, dk1, dk2, HALF)
    cols = tl.arange(0, D)
    dv_ptrs = DV + b * stride_dvb + kv_h * stride_dvh + pos_k[:, None] * stride_dvt + cols[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=inside)
