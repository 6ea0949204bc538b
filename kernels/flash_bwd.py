"""Flash-attention backward, FA2-style, in one kernel: one program per key block and kv head
loops over the query blocks (and the q heads of its GQA group, so the group sum of dk, dv
stays in registers), keeps dk and dv in registers, and adds each query block's share of dq
into a float32 buffer with atomics. Five tile GEMMs per (key block, query block) pair: the
scores S = K Q^T, dP = V dO^T, dV += P dO, dK += dS Q and dQ += dS^T K.

delta = rowsum(dO * O) is recomputed from the O and dO tiles in every program instead of in
a kernel of its own (the model step is host-bound, so a launch costs more than the loads).
The atomics make dq's float32 rounding depend on the order the programs finish in, so dq
is not bitwise reproducible run to run (as in FlashAttention 2 and cuDNN).
Tile conventions: kernels/flash_tiles.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnbench.kernels.flash_tiles import (
    FlashProblem,
    add_qk_grad_t,
    empty,
    flash_autotune,
    load_qk,
    load_rows,
    mma,
    qk_dot,
    query_blocks,
    score_tile,
    store_qk_grad,
    store_rows,
    tile_config,
)


@triton.jit
def _bwd_query_loop(
    dk_a, dk_b, dv, k_a, k_b, kt_a, kt_b, v, pos_k, Q, O, DO, DQ, LSE, stride_qt, stride_qd, stride_ot, stride_od,
    stride_dot, stride_dod, stride_dqt, stride_dqd, COS, SIN, start, stop, T, S, kv_len, left, right, scale, scale_log2, slope_log2,
    HEAD_DIM: tl.constexpr, PART: tl.constexpr, D_PAD: tl.constexpr, ROPE: tl.constexpr,
    ALIBI: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Accumulate one q head's contribution to dk, dv [BLOCK_N, *] over query blocks [start, stop)
    and add the blocks' dq shares into DQ. Scores are kept transposed ([keys, queries]) so dk and
    dv come out without a transpose, and dq as dq^T = K^T dS^T ([D, queries])."""
    dims = tl.arange(0, D_PAD)
    for q_start in range(start, stop, BLOCK_M):
        rows = q_start + tl.arange(0, BLOCK_M)
        pos_q = rows + S - T
        q_a, q_b = load_qk(Q, rows, T, stride_qt, stride_qd, COS, SIN, pos_q, HEAD_DIM, PART, ROPE)
        do = load_rows(DO, rows, T, stride_dot, dims, HEAD_DIM, stride_dod)
        o = load_rows(O, rows, T, stride_ot, dims, HEAD_DIM, stride_od)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        # rows past T read lse = +inf, so their probabilities are exactly 0
        lse = tl.load(LSE + rows, mask=rows < T, other=float("inf"))
        s_t = qk_dot(k_a, k_b, q_a, q_b, ROPE, PRECISION)
        s_t = score_tile(s_t, pos_q[None, :], pos_k[:, None], kv_len, left, right, scale_log2, slope_log2, ALIBI, MASKED)
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = mma(p_t.to(do.dtype), do, dv, PRECISION)
        dp_t = mma(v, tl.trans(do), None, PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        dk_a = mma(ds_t, q_a, dk_a, PRECISION)
        dqt_a = mma(kt_a, ds_t, None, PRECISION) * scale
        dqt_b = dqt_a
        if ROPE:
            dk_b = mma(ds_t, q_b, dk_b, PRECISION)
            dqt_b = mma(kt_b, ds_t, None, PRECISION) * scale
        add_qk_grad_t(DQ, dqt_a, dqt_b, rows, T, stride_dqt, stride_dqd, COS, SIN, pos_q, HEAD_DIM, PART, ROPE)
    return dk_a, dk_b, dv


@flash_autotune(
    {
        64: [tile_config(32, 128, 4, 3), tile_config(64, 64, 4, 2), tile_config(64, 128, 8, 2), tile_config(16, 128, 4, 3)],
        128: [tile_config(32, 128, 8, 2), tile_config(32, 128, 8, 3), tile_config(64, 128, 8, 2)],
        256: [tile_config(32, 64, 8, 2)],
    },
    fp32=tile_config(32, 32, 4, 1),
    interpret=tile_config(16, 32, 4, 1),
)
@triton.jit
def flash_bwd_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, SEQ_LENS, SLOPES, COS, SIN,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    T, S, HQ, HKV, GROUP, left, right, scale, scale_log2, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, PART: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, ALIBI: tl.constexpr, HAS_SEQ_LENS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_N), B * Hkv): dk, dv [B, S, Hkv, D] summed over the GROUP q heads
    that share the kv head (k and v stay in registers for the whole loop), and dq [B, T, Hq, D]
    float32 added into DQ (zeros on entry)."""
    bh = tl.program_id(1)
    b = bh // HKV
    kv_h = bh % HKV
    kv_len = tl.load(SEQ_LENS + b) if HAS_SEQ_LENS else S
    kv_len = tl.minimum(kv_len, S)
    k_start = tl.program_id(0) * BLOCK_N
    keys = k_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    K += b.to(tl.int64) * stride_kb + kv_h * stride_kh
    V += b.to(tl.int64) * stride_vb + kv_h * stride_vh
    k_a, k_b = load_qk(K, keys, S, stride_kt, stride_kd, COS, SIN, keys, HEAD_DIM, PART, ROPE)
    v = load_rows(V, keys, S, stride_vt, dims, HEAD_DIM, stride_vd)
    kt_a = tl.trans(k_a)  # dq^T = K^T dS^T: M = D rows suit Hopper's 64-row MMA at any BLOCK_M
    kt_b = tl.trans(k_b)

    dk_a = tl.zeros([BLOCK_N, PART], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, PART], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    lo, full_lo, full_hi, hi = query_blocks(k_start, T, S, kv_len, left, right, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        slope_log2 = tl.load(SLOPES + h) * 1.4426950408889634 if ALIBI else 0.0
        Q_h = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        O_h = O + b.to(tl.int64) * stride_ob + h * stride_oh
        DO_h = DO + b.to(tl.int64) * stride_dob + h * stride_doh
        DQ_h = DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh
        LSE_h = LSE + (b * HQ + h).to(tl.int64) * T
        # the window's left edge (masked), the query blocks that see the whole key block, the diagonal / right edge
        dk_a, dk_b, dv = _bwd_query_loop(
            dk_a, dk_b, dv, k_a, k_b, kt_a, kt_b, v, keys, Q_h, O_h, DO_h, DQ_h, LSE_h, stride_qt, stride_qd, stride_ot, stride_od,
            stride_dot, stride_dod, stride_dqt, stride_dqd, COS, SIN, lo, full_lo, T, S, kv_len, left, right, scale, scale_log2, slope_log2,
            HEAD_DIM, PART, D_PAD, ROPE, ALIBI, True, PRECISION, BLOCK_M,
        )
        dk_a, dk_b, dv = _bwd_query_loop(
            dk_a, dk_b, dv, k_a, k_b, kt_a, kt_b, v, keys, Q_h, O_h, DO_h, DQ_h, LSE_h, stride_qt, stride_qd, stride_ot, stride_od,
            stride_dot, stride_dod, stride_dqt, stride_dqd, COS, SIN, full_lo, full_hi, T, S, kv_len, left, right, scale, scale_log2, slope_log2,
            HEAD_DIM, PART, D_PAD, ROPE, ALIBI, False, PRECISION, BLOCK_M,
        )
        dk_a, dk_b, dv = _bwd_query_loop(
            dk_a, dk_b, dv, k_a, k_b, kt_a, kt_b, v, keys, Q_h, O_h, DO_h, DQ_h, LSE_h, stride_qt, stride_qd, stride_ot, stride_od,
            stride_dot, stride_dod, stride_dqt, stride_dqd, COS, SIN, full_hi, hi, T, S, kv_len, left, right, scale, scale_log2, slope_log2,
            HEAD_DIM, PART, D_PAD, ROPE, ALIBI, True, PRECISION, BLOCK_M,
        )

    DK += b.to(tl.int64) * stride_dkb + kv_h * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + kv_h * stride_dvh
    # d(score)/dk carries the softmax scale; the scores' log2(e) is already undone by exp2
    store_qk_grad(DK, dk_a * scale, dk_b * scale, keys, S, stride_dkt, stride_dkd, COS, SIN, keys, HEAD_DIM, PART, ROPE)
    store_rows(DV, dv, keys, S, stride_dvt, dims, HEAD_DIM, stride_dvd)


def flash_backward(q, k, v, o, lse, do, problem: FlashProblem):
    """dq [B, T, Hq, D], dk and dv [B, S, Hkv, D] (dtypes of q, k, v) from the forward's o and lse."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    dq = torch.zeros((b, t, hq, d), dtype=torch.float32, device=q.device)  # atomics add into it
    dk = empty((b, s, hkv, d), k.dtype, k.device)
    dv = empty((b, s, hkv, d), v.dtype, v.device)
    flash_bwd_kernel[lambda m: (triton.cdiv(s, m["BLOCK_N"]), b * hkv)](
        q, k, v, o, do, dq, dk, dv, lse, *problem.tensors(q),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        t, s, hq, hkv, hq // hkv, problem.left, problem.right, problem.scale, problem.scale_log2, **problem.launch_kwargs(),
    )
    return dq.to(q.dtype), dk, dv
