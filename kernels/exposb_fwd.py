"""ExpoSB's forward kernel (@triton.jit): one program per BLOCK_M query rows and query head,
online softmax in base 2 over the key tiles of each regime; writes o and the LSE.
kernels/exposb.py has the math, exposb_launch.py the launcher."""

import triton
import triton.language as tl

from attnbench.kernels.exposb_tiles import (
    ABOVE, BELOW, DIAGONAL, LOG2E, distance_weight, head_params, key_ranges, load_transformed, scores,
    visible,
)


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
        k1, k2, _, _, _ = load_transformed(K, stride_kt, stride_kd, pos_k, pos_k, S, COS, SIN, lam, alpha, f1, f2, D // 2)
        v = tl.load(V + pos_k[:, None] * stride_vt + cols[None, :] * stride_vd, mask=(pos_k < S)[:, None], other=0.0)
        qk = scores(q1, q2, k1.to(q1.dtype), k2.to(q1.dtype), DOT_PRECISION)  # [BM, BN]
        w = distance_weight(pos_q, pos_k, pos_q0, delta, REGIME, BLOCK_M)
        s2 = qk * w * (sm_scale * LOG2E)
        s2 = tl.where(visible(pos_q, pos_k, kv_len, REGIME, CAUSAL), s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s2 - m_safe[:, None])
        correction = tl.exp2(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def exposb_fwd_kernel(
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
    lam, alpha, _, _, _, delta, f1, f2, _, _ = head_params(LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, D // 2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    q_base = Q + b * stride_qb + h * stride_qh
    # q' stays in registers for the whole loop
    q1, q2, _, _, _ = load_transformed(q_base, stride_qt, stride_qd, rows, pos_q, T, COS, SIN, lam, alpha, f1, f2, D // 2)
    q1 = q1.to(Q.dtype.element_ty)
    q2 = q2.to(Q.dtype.element_ty)
    k_base = K + b * stride_kb + (h // GROUP) * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    below_end, above_start, hi = key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
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
