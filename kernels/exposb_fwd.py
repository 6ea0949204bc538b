"""ExpoSB's forward kernel (@triton.jit): one program per BLOCK_M query rows and query head,
online softmax in base 2 over the key tiles of each regime, reading q' and k' as the prepass
(exposb_prepass.py) wrote them; writes o and the LSE. kernels/exposb.py has the math,
exposb_launch.py the launcher."""

import triton
import triton.language as tl

from attnbench.kernels.exposb_tiles import ABOVE, BELOW, DIAGONAL, LOG2E, distance_weight, key_ranges, load_tile, visible


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, pos_q, pos_q0, lo, hi, K, V, stride_kt, stride_kd, stride_vt, stride_vd, S, kv_len,
    delta, scale_log2,
    REGIME: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) of one regime (base 2: exp2 and log2 units);
    the flash loop with the decay's multiply per score."""
    for n0 in range(lo, hi, BLOCK_N):
        pos_k = n0 + tl.arange(0, BLOCK_N)
        k = load_tile(K, stride_kt, stride_kd, pos_k, S, D)
        v = load_tile(V, stride_vt, stride_vd, pos_k, S, D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        s2 = qk * distance_weight(pos_q[:, None], pos_k[None, :], pos_q0, delta, scale_log2, REGIME, BLOCK_M)
        s2 = tl.where(visible(pos_q[:, None], pos_k[None, :], kv_len, REGIME, CAUSAL), s2, float("-inf"))
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
    Q, K, V, O, LSE, DELTA, SEQ_LENS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    H, GROUP, T, S, sm_scale,
    HAS_LENS: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head). Q = q' [B, T, Hq, D],
    K = k' [B, S, Hq, D] (per query head), V [B, S, Hkv, D] (head h // GROUP).
    LSE [B, Hq, T] in log2 units."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kv_len = S
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(SEQ_LENS + b), S)
    delta = tl.load(DELTA + h)
    scale_log2 = sm_scale * LOG2E

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q0 = pid_m * BLOCK_M + S - T
    pos_q = rows + S - T
    # q' stays in registers for the whole loop
    q = load_tile(Q + b * stride_qb + h * stride_qh, stride_qt, stride_qd, rows, T, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + (h // GROUP) * stride_vh

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    below_end, above_start, hi = key_ranges(pos_q0, kv_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, pos_q, pos_q0, 0, below_end, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        S, kv_len, delta, scale_log2, BELOW, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, pos_q, pos_q0, below_end, above_start, k_base, v_base, stride_kt, stride_kd, stride_vt,
        stride_vd, S, kv_len, delta, scale_log2, DIAGONAL, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
    )
    if not CAUSAL:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, pos_q, pos_q0, above_start, hi, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, S, kv_len, delta, scale_log2, ABOVE, CAUSAL, D, BLOCK_M, BLOCK_N, DOT_PRECISION,
        )

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that see no key: zeros
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # +inf: P = 0 in backward
    cols = tl.arange(0, D)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + cols[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(rows < T)[:, None])
    tl.store(LSE + (b * H + h) * T + rows, lse, mask=rows < T)
