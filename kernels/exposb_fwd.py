"""ExpoSB's forward kernel (@triton.jit): one program per BLOCK_M query rows and query head,
online softmax in base 2 over the key tiles of each regime; it forms its rows' q' itself (once,
as the prepass would; written out for the backward when asked) and reads k' as the prepass
(exposb_prepass.py) wrote it; writes o and the LSE. kernels/exposb.py has the math,
exposb_launch.py the launcher."""

import triton
import triton.language as tl

from attnbench.kernels.exposb_tiles import (
    ABOVE, BELOW, DIAGONAL, LOG2E, head_params, key_ranges, load_transformed, owner_factor, query_block_pivot, store_rows,
    tile_weight, visible, whole,
)
from attnbench.kernels.flash_tiles import read_rows, tile_source


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, pos_q, row_factor, pivot, lo, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd, S, kv_len,
    rate, scale_log2,
    REGIME: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) of one regime (base 2: exp2 and log2 units).
    K, V: tile sources (flash_tiles.tile_source). The score in log2 units is t * row_factor with
    t = q'.k' * tile_weight (exposb_tiles.owner_factor, tile_weight): off the diagonal one multiply
    per score for t, and row_factor (> 0) rides on the row max and on exp2's FMA, as the scale does
    in the standard kernel (flash_fwd._fwd_key_loop). MASKED: test each score (visible)."""
    for n0 in range(lo, hi, BLOCK_N):
        pos_k = n0 + tl.arange(0, BLOCK_N)
        k = read_rows(K, n0, S, stride_kt, stride_kd, D, BLOCK_N, D, TMA)
        v = read_rows(V, n0, S, stride_vt, stride_vd, D, BLOCK_N, D, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        t = qk * tile_weight(pos_q, pos_k, pivot, rate, scale_log2, REGIME)
        if MASKED:  # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead
            t = tl.where(visible(pos_q[:, None], pos_k[None, :], kv_len, REGIME, CAUSAL), t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, 1) * row_factor)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(t, 1) * row_factor)
            m_safe = m_new
        p = tl.exp2(t * row_factor[:, None] - m_safe[:, None])
        correction = tl.exp2(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_regime(
    acc, l_i, m_i, q, pos_q, pos_q0, lo, full_end, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd, S, kv_len,
    rate, scale_log2,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """The key tiles [lo, hi) of one regime: [lo, full_end) unmasked (none on the diagonal),
    [full_end, hi) masked; the regime's query factor (softmax scale folded in) formed once, here."""
    pivot = query_block_pivot(pos_q0, REGIME, BLOCK_M)
    row_factor = owner_factor(pos_q, pivot, rate, scale_log2, REGIME)  # [BM]
    if REGIME != DIAGONAL:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, pos_q, row_factor, pivot, lo, full_end, K, V, stride_kt, stride_kd, stride_vt,
            stride_vd, S, kv_len, rate, scale_log2, REGIME, False, CAUSAL, D, BLOCK_N, DOT_PRECISION, TMA,
        )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, pos_q, row_factor, pivot, full_end, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
        S, kv_len, rate, scale_log2, REGIME, True, CAUSAL, D, BLOCK_N, DOT_PRECISION, TMA,
    )
    return acc, l_i, m_i


@triton.jit
def exposb_fwd_kernel(
    Q, K, V, O, LSE, QT, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, SEQ_LENS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_tb, stride_tt, stride_th, stride_td,
    H, GROUP, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    STORE_QT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head). Q: the raw q [B, T, Hq, D], whose
    q' this program forms once per row (the prepass's transform, rounded to q's dtype) and, when
    STORE_QT, writes to QT [B, T, Hq, D] (strides stride_t*) for the backward; K = k' [B, S, Hq, D]
    (per query head, from the prepass), V [B, S, Hkv, D] (head h // GROUP). LSE [B, Hq, T] in log2
    units. TMA: k', v tiles through tensor descriptors (the launcher says when)."""
    HALF: tl.constexpr = D // 2
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    lam, alpha, _, _, _, delta, f1, f2, _, _ = head_params(LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF)
    rate = delta * LOG2E
    scale_log2 = sm_scale * LOG2E

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    # q' stays in registers for the whole loop
    q1, q2, _, _, _ = load_transformed(
        Q + b * stride_qb + h * stride_qh, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, HALF
    )
    q1, q2 = q1.to(Q.dtype.element_ty), q2.to(Q.dtype.element_ty)
    if STORE_QT:
        store_rows(QT + b * stride_tb + h * stride_th, stride_tt, stride_td, rows, (rows < T)[:, None], q1, q2, HALF)
    q = whole(q1, q2, BLOCK_M, D)
    K = tile_source(K + b * stride_kb + h * stride_kh, S, stride_kt, D, BLOCK_N, D, TMA)
    V = tile_source(V + b * stride_vb + (h // GROUP) * stride_vh, S, stride_vt, D, BLOCK_N, D, TMA)

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    below_full, below_end, above_start, above_full, hi = key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_regime(
        acc, l_i, m_i, q, pos_q, pos_q0, 0, below_full, below_end, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
        S, kv_len, rate, scale_log2, BELOW, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION, TMA,
    )
    acc, l_i, m_i = _fwd_regime(  # the diagonal stays masked throughout
        acc, l_i, m_i, q, pos_q, pos_q0, below_end, below_end, above_start, K, V, stride_kt, stride_kd, stride_vt,
        stride_vd, S, kv_len, rate, scale_log2, DIAGONAL, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION, TMA,
    )
    if not CAUSAL:
        acc, l_i, m_i = _fwd_regime(
            acc, l_i, m_i, q, pos_q, pos_q0, above_start, above_full, hi, K, V, stride_kt, stride_kd, stride_vt,
            stride_vd, S, kv_len, rate, scale_log2, ABOVE, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION, TMA,
        )

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that see no key: zeros
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # +inf: P = 0 in backward
    cols = tl.arange(0, D)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + cols[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(rows < T)[:, None])
    tl.store(LSE + (b * H + h) * T + rows, lse, mask=rows < T)
