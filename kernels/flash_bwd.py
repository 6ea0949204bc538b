"""Flash-attention backward, FA2-style, in two kernels and without atomics: dq first (one
program per query block, looping over key blocks; it also stores delta = rowsum(dO * O) of
its rows), then dk/dv (one program per key block and kv head, looping over query blocks and
over the q heads of its GQA group, so the group sum stays in registers), which reads delta.
Tile conventions: kernels/flash_tiles.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnbench.kernels.flash_dkdv_hopper import flash_dkdv_hopper, hopper_dkdv_route
from attnbench.kernels.flash_launch import FlashProblem, blocks, empty, flash_autotune, tile_config, use_tma
from attnbench.kernels.flash_rope import unrotate_rows
from attnbench.kernels.flash_tiles import (
    alibi_slope,
    key_blocks,
    listed_ranges,
    load_rows,
    mma,
    query_blocks,
    query_program,
    read_rows,
    read_vector,
    row_offset,
    score_tile,
    sequence,
    store_rows,
    tile_source,
    tile_start,
    vector_source,
)


@triton.jit
def _dkdv_query_loop(
    dk, dv, k, v, pos_k, Q, DO, LSE, DELTA, LIST, stride_qt, stride_qd, stride_dot, stride_dod,
    start, stop, first, T, S, kv_len, left, right, scale_log2, alibi,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr, EDGES: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, TMA: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
):
    """Accumulate one q head's contribution to dk, dv [BLOCK_N, *] over query tiles [start, stop):
    rows, or positions in LIST's tiles when block-sparse (flash_tiles.tile_start).
    Scores are kept transposed ([keys, queries]) so dk and dv come out without a transpose.
    Q, DO: tile sources (flash_tiles.tile_source); LSE, DELTA: vector sources (flash_tiles.vector_source)
    of whole statistics rows, read from ``first`` on (a packed sequence's first row).
    Rows past T read 0 in q, dO, lse and delta alike, so they add nothing: p = 1 there, but
    dO = 0 (no dv) and dS = p * (0 - 0) = 0 (no dk)."""
    for n in range(start, stop, 1 if SPARSE_BLOCK else BLOCK_M):
        q_start = tile_start(LIST, n, SPARSE_BLOCK, BLOCK_M)
        rows = q_start + tl.arange(0, BLOCK_M)
        pos_q = rows + S - T
        q = read_rows(Q, q_start, T, stride_qt, stride_qd, HEAD_DIM, BLOCK_M, D_PAD, TMA)
        do = read_rows(DO, q_start, T, stride_dot, stride_dod, HEAD_DIM, BLOCK_M, D_PAD, TMA)
        lse = read_vector(LSE, first + q_start, first + T, BLOCK_M, TMA)
        delta = read_vector(DELTA, first + q_start, first + T, BLOCK_M, TMA)
        s_t = mma(k, tl.trans(q), None, PRECISION)
        s_t = score_tile(s_t, pos_q[None, :], pos_k[:, None], kv_len, left, right, alibi, ALIBI, MASKED, EDGES)
        p_t = tl.math.exp2(s_t * scale_log2 - lse[None, :])
        dv = mma(p_t.to(do.dtype), do, dv, PRECISION)
        dp_t = mma(v, tl.trans(do), None, PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = mma(ds_t, q, dk, PRECISION)
    return dk, dv


@flash_autotune(
    {
        # the fastest at D=64 causal, T 1k and 4k: 235 registers capped at 168, three programs per SM
        # instead of two (H200: 0.198 / 0.523 ms whole backward, cuDNN 0.197 / 0.500; reference-h200/registers);
        # uncapped second, as fast at 4k (0.553) and without the spills the cap costs ALiBi's loop
        64: [tile_config(64, 64, 4, 3, 168), tile_config(64, 64, 4, 3)],
        # first (the one tile below 4k): the fastest whole backward at D = 128 causal, T 512 / 1k / 2k, 16k tokens,
        # H 16 (H200, TMA: 0.512 / 0.678 / 1.063 ms against 0.577 / 0.768 / 1.158 for 64x128, reference-h200/short-tiles);
        # the other two: causal 4k 2.21 / 2.41 ms (reference-h200/tma-followup)
        128: [tile_config(64, 64, 4, 2), tile_config(64, 128, 8, 2), tile_config(32, 128, 8, 2)],
        256: [tile_config(32, 64, 8, 2)],
    },
    fp32=tile_config(32, 32, 4, 1),
    interpret=tile_config(16, 32, 4, 1),
)
@triton.jit
def flash_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, SEQ_LENS, CU_SEQLENS, SLOPES, COS, SIN, Q_NUM, Q_IDX,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dkb, stride_dkt, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvh, stride_dvd,
    T, S, HQ, HKV, GROUP, stride_stats, left, right, scale, scale_log2, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, HAS_SEQ_LENS: tl.constexpr,
    EDGES: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, ROPE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_N), B * Hkv): dk, dv [B, S, Hkv, D] summed over the GROUP q heads
    that share kv head; k and v stay in registers for the whole loop. ROPE: q and k came rotated
    (kernels/flash_rope.py), and dk is rotated back by COS, SIN [S, D/2] before it is stored.
    SPARSE_BLOCK > 0: each q head visits only the query blocks Q_NUM, Q_IDX list (FlashProblem).
    VARLEN: packed sequences, as the forward's; grid (cdiv(longest, BLOCK_N), N * Hkv)."""
    b = tl.program_id(1) // HKV
    kv_h = tl.program_id(1) % HKV
    b, first, T, S = sequence(CU_SEQLENS, b, T, S, VARLEN)
    kv_len = tl.load(SEQ_LENS + b) if HAS_SEQ_LENS else S
    kv_len = tl.minimum(kv_len, S)
    k_start = tl.program_id(0) * BLOCK_N
    if VARLEN:
        if k_start >= S:  # a sequence shorter than the longest has no keys in this block
            return
    keys = k_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    K += row_offset(b, first, stride_kb, stride_kt) + kv_h * stride_kh
    V += row_offset(b, first, stride_vb, stride_vt) + kv_h * stride_vh
    k = load_rows(K, keys, S, stride_kt, dims, HEAD_DIM, stride_kd)
    v = load_rows(V, keys, S, stride_vt, dims, HEAD_DIM, stride_vd)

    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    lo, full_lo, full_hi, hi = query_blocks(k_start, T, S, kv_len, left, right, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        alibi = alibi_slope(SLOPES, h, scale_log2, ALIBI)
        Q_h = Q + row_offset(b, first, stride_qb, stride_qt) + h * stride_qh
        DO_h = DO + row_offset(b, first, stride_dob, stride_dot) + h * stride_doh
        Q_h = tile_source(Q_h, T, stride_qt, HEAD_DIM, BLOCK_M, D_PAD, TMA)
        DO_h = tile_source(DO_h, T, stride_dot, HEAD_DIM, BLOCK_M, D_PAD, TMA)
        # whole rows: a descriptor's base must be 16-byte aligned, a packed sequence's first float need not be
        LSE_h = vector_source(LSE + (b * HQ + h).to(tl.int64) * stride_stats, first + T, BLOCK_M, TMA)
        DELTA_h = vector_source(DELTA + (b * HQ + h).to(tl.int64) * stride_stats, first + T, BLOCK_M, TMA)
        LIST = Q_IDX
        q_lo, q_full_lo, q_full_hi, q_hi = lo, full_lo, full_hi, hi
        if SPARSE_BLOCK:  # the same split, over the tiles of the query blocks listed as visiting this key block
            row = (b * HQ + h).to(tl.int64) * tl.cdiv(S, SPARSE_BLOCK) + k_start // SPARSE_BLOCK
            LIST = Q_IDX + row * tl.cdiv(T, SPARSE_BLOCK)
            q_lo, q_full_lo, q_full_hi, q_hi = listed_ranges(LIST, tl.load(Q_NUM + row), lo, full_lo, full_hi, hi, SPARSE_BLOCK, BLOCK_M)
        # masked, unmasked, masked (flash_tiles.query_blocks)
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, keys, Q_h, DO_h, LSE_h, DELTA_h, LIST, stride_qt, stride_qd, stride_dot, stride_dod,
            q_lo, q_full_lo, first, T, S, kv_len, left, right, scale_log2, alibi,
            HEAD_DIM, D_PAD, ALIBI, True, EDGES, PRECISION, BLOCK_M, TMA, SPARSE_BLOCK,
        )
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, keys, Q_h, DO_h, LSE_h, DELTA_h, LIST, stride_qt, stride_qd, stride_dot, stride_dod,
            q_full_lo, q_full_hi, first, T, S, kv_len, left, right, scale_log2, alibi,
            HEAD_DIM, D_PAD, ALIBI, False, EDGES, PRECISION, BLOCK_M, TMA, SPARSE_BLOCK,
        )
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, keys, Q_h, DO_h, LSE_h, DELTA_h, LIST, stride_qt, stride_qd, stride_dot, stride_dod,
            q_full_hi, q_hi, first, T, S, kv_len, left, right, scale_log2, alibi,
            HEAD_DIM, D_PAD, ALIBI, True, EDGES, PRECISION, BLOCK_M, TMA, SPARSE_BLOCK,
        )

    DK += row_offset(b, first, stride_dkb, stride_dkt) + kv_h * stride_dkh
    DV += row_offset(b, first, stride_dvb, stride_dvt) + kv_h * stride_dvh
    # d(score)/dk carries the softmax scale; the scores' log2(e) is already undone by exp2
    dk *= scale
    if ROPE:
        dk = unrotate_rows(dk, keys, S, keys, COS, SIN, HEAD_DIM, D_PAD)
    store_rows(DK, dk, keys, S, stride_dkt, dims, HEAD_DIM, stride_dkd)
    store_rows(DV, dv, keys, S, stride_dvt, dims, HEAD_DIM, stride_dvd)


@triton.jit
def _dq_key_loop(
    dq, q, do, lse, delta, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
    start, stop, kv_len, left, right, scale_log2, alibi,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr, EDGES: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
):
    """Key tiles [start, stop), as flash_fwd._fwd_key_loop's. K, V: tile sources (flash_tiles.tile_source)."""
    for n in range(start, stop, 1 if SPARSE_BLOCK else BLOCK_N):
        k_start = tile_start(LIST, n, SPARSE_BLOCK, BLOCK_N)
        keys = k_start + tl.arange(0, BLOCK_N)
        k = read_rows(K, k_start, kv_len, stride_kt, stride_kd, HEAD_DIM, BLOCK_N, D_PAD, TMA)
        v = read_rows(V, k_start, kv_len, stride_vt, stride_vd, HEAD_DIM, BLOCK_N, D_PAD, TMA)
        s = mma(q, tl.trans(k), None, PRECISION)
        s = score_tile(s, pos_q[:, None], keys[None, :], kv_len, left, right, alibi, ALIBI, MASKED, EDGES)
        p = tl.math.exp2(s * scale_log2 - lse[:, None])
        dp = mma(do, tl.trans(v), None, PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = mma(ds, k, dq, PRECISION)
    return dq


@flash_autotune(
    {
        # the two fastest at D=64 causal, T 1k and 4k, tiles through TMA (H200: results/reference-h200/tma/tiles.csv)
        64: [tile_config(64, 64, 4, 3), tile_config(64, 128, 4, 3)],
        128: [tile_config(128, 64, 8, 3), tile_config(128, 64, 8, 2)],
        256: [tile_config(128, 32, 8, 2)],
    },
    fp32=tile_config(32, 32, 4, 1),
    interpret=tile_config(32, 16, 4, 1),
)
@triton.jit
def flash_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, SEQ_LENS, CU_SEQLENS, SLOPES, COS, SIN, KV_NUM, KV_IDX,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    T, S, HQ, GROUP, stride_stats, left, right, scale, scale_log2, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, HAS_SEQ_LENS: tl.constexpr,
    EDGES: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, ROPE: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), B * Hq): dq [B, T, Hq, D] and DELTA [B, Hq, T] float32 (LSE's row stride) =
    rowsum(dO * O) (one launch fewer than a kernel of its own); q, dO, lse, delta stay in registers.
    ROPE: as flash_dkdv_kernel's, for dq (rows at positions row + S - T). SPARSE_BLOCK, VARLEN: as the forward's."""
    block, bh, b, h, kv_h, first, T, S, kv_len, alibi = query_program(
        SEQ_LENS, CU_SEQLENS, SLOPES, T, S, HQ, GROUP, scale_log2, CAUSAL, HAS_SEQ_LENS, ALIBI, VARLEN
    )
    q_start = block * BLOCK_M
    if VARLEN:
        if q_start >= T:  # a sequence shorter than the longest has no rows in this block
            return
    Q += row_offset(b, first, stride_qb, stride_qt) + h * stride_qh
    O += row_offset(b, first, stride_ob, stride_ot) + h * stride_oh
    DO += row_offset(b, first, stride_dob, stride_dot) + h * stride_doh
    K += row_offset(b, first, stride_kb, stride_kt) + kv_h * stride_kh
    V += row_offset(b, first, stride_vb, stride_vt) + kv_h * stride_vh
    K = tile_source(K, kv_len, stride_kt, HEAD_DIM, BLOCK_N, D_PAD, TMA)
    V = tile_source(V, kv_len, stride_vt, HEAD_DIM, BLOCK_N, D_PAD, TMA)
    rows = q_start + tl.arange(0, BLOCK_M)
    pos_q = rows + S - T
    dims = tl.arange(0, D_PAD)
    q = load_rows(Q, rows, T, stride_qt, dims, HEAD_DIM, stride_qd)
    do = load_rows(DO, rows, T, stride_dot, dims, HEAD_DIM, stride_dod)
    lse = tl.load(LSE + bh.to(tl.int64) * stride_stats + first + rows, mask=rows < T, other=float("inf"))
    o = load_rows(O, rows, T, stride_ot, dims, HEAD_DIM, stride_od)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * stride_stats + first + rows, delta, mask=rows < T)

    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_blocks(q_start, T, S, kv_len, left, right, BLOCK_M, BLOCK_N)
    LIST = KV_IDX
    if SPARSE_BLOCK:  # the key blocks listed for this tile's query block, as in the forward
        row = bh.to(tl.int64) * tl.cdiv(T, SPARSE_BLOCK) + q_start // SPARSE_BLOCK
        LIST = KV_IDX + row * tl.cdiv(S, SPARSE_BLOCK)
        lo, full_lo, full_hi, hi = listed_ranges(LIST, tl.load(KV_NUM + row), lo, full_lo, full_hi, hi, SPARSE_BLOCK, BLOCK_N)
    # the window's left edge, then tiles every row sees in full, then the diagonal/right edge
    dq = _dq_key_loop(
        dq, q, do, lse, delta, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
        lo, full_lo, kv_len, left, right, scale_log2, alibi,
        HEAD_DIM, D_PAD, ALIBI, True, EDGES, PRECISION, BLOCK_N, TMA, SPARSE_BLOCK,
    )
    dq = _dq_key_loop(
        dq, q, do, lse, delta, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
        full_lo, full_hi, kv_len, left, right, scale_log2, alibi,
        HEAD_DIM, D_PAD, ALIBI, False, EDGES, PRECISION, BLOCK_N, TMA, SPARSE_BLOCK,
    )
    dq = _dq_key_loop(
        dq, q, do, lse, delta, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
        full_hi, hi, kv_len, left, right, scale_log2, alibi,
        HEAD_DIM, D_PAD, ALIBI, True, EDGES, PRECISION, BLOCK_N, TMA, SPARSE_BLOCK,
    )
    DQ += row_offset(b, first, stride_dqb, stride_dqt) + h * stride_dqh
    dq *= scale
    if ROPE:
        dq = unrotate_rows(dq, rows, T, pos_q, COS, SIN, HEAD_DIM, D_PAD)
    store_rows(DQ, dq, rows, T, stride_dqt, dims, HEAD_DIM, stride_dqd)


def flash_backward(q, k, v, o, lse, do, problem: FlashProblem, grads: tuple[torch.Tensor, ...] | None = None):
    """dq [B, T, Hq, D], dk and dv [B, S, Hkv, D] (dtypes of q, k, v) from the forward's o and lse
    (flash_forward's padded rows),
    written into ``grads`` (any strides, e.g. views of one packed gradient) or new tensors. With
    RoPE, q and k are the rotated ones and dq, dk come out for the unrotated q and k."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    delta = empty(lse.shape, torch.float32, q.device)  # rows like lse's; written by the dq kernel, read by dk/dv's
    if grads is None:
        dq, dk, dv = empty(q.shape, q.dtype, q.device), empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
    else:
        dq, dk, dv = grads
    extras = (*problem.tensors(q), *problem.rope_tables(q))
    strides = (*q.stride(), *k.stride(), *v.stride())  # both kernels take q, k, v first
    do_strides, stats = do.stride(), lse.stride(1)
    scalars = (problem.left, problem.right, problem.scale, problem.scale_log2)
    # packed sequences read their tiles without TMA here: the H200 stopped at an illegal instruction in the
    # varlen backward with per-sequence descriptors (results/reference-h200/serve/), the forward ran
    tma = problem.cu_seqlens is None
    rows, sequences = problem.programs(b, t)
    flash_dq_kernel[lambda m: (blocks(rows, m["BLOCK_M"]), sequences * hq)](
        q, k, v, o, do, dq, lse, delta, *extras, *problem.key_lists(q),
        *strides, *o.stride(), *do_strides, *dq.stride(),
        t, s, hq, hq // hkv, stats, *scalars, TMA=tma and use_tma(problem, k, v), ROPE=problem.rope, **problem.launch_kwargs,
    )
    if hopper_dkdv_route(problem, q, k, v, do, dk, dv) is None:
        flash_dkdv_hopper(q, k, v, do, dk, dv, lse, delta, problem)
        return dq, dk, dv
    keys, sequences = problem.programs(b, s)
    flash_dkdv_kernel[lambda m: (blocks(keys, m["BLOCK_N"]), sequences * hkv)](
        q, k, v, do, dk, dv, lse, delta, *extras, *problem.query_lists(q),
        *strides, *do_strides, *dk.stride(), *dv.stride(),
        t, s, hq, hkv, hq // hkv, stats, *scalars, TMA=tma and use_tma(problem, q, do), ROPE=problem.rope, **problem.launch_kwargs,
    )
    return dq, dk, dv
