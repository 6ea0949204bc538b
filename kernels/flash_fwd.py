"""Flash-attention forward: online softmax over key tiles, o and the log-sum-exp out.

One program per (query block, batch * query head); q stays in registers for the whole key
loop, and no T x S matrix ever reaches memory. Tile conventions: kernels/flash_tiles.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnbench.kernels.flash_fwd_hopper import flash_forward_hopper, hopper_route
from attnbench.kernels.flash_launch import FlashProblem, blocks, empty, flash_autotune, stats_row_length, tile_config, use_tma
from attnbench.kernels.flash_tiles import (
    key_blocks,
    listed_ranges,
    load_rows,
    mma,
    query_program,
    read_rows,
    row_offset,
    score_tile,
    store_rows,
    tile_source,
    tile_start,
)


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
    start, stop, kv_len, left, right, scale_log2, alibi,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr, EDGES: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
):
    """Key tiles [start, stop): rows, or positions in LIST's tiles when block-sparse (tile_start).
    K, V: tile sources (flash_tiles.tile_source). m_i: each row's running max, in log2 units."""
    for n in range(start, stop, 1 if SPARSE_BLOCK else BLOCK_N):
        k_start = tile_start(LIST, n, SPARSE_BLOCK, BLOCK_N)
        keys = k_start + tl.arange(0, BLOCK_N)
        k = read_rows(K, k_start, kv_len, stride_kt, stride_kd, HEAD_DIM, BLOCK_N, D_PAD, TMA)
        v = read_rows(V, k_start, kv_len, stride_vt, stride_vd, HEAD_DIM, BLOCK_N, D_PAD, TMA)
        s = mma(q, tl.trans(k), None, PRECISION)
        s = score_tile(s, pos_q[:, None], keys[None, :], kv_len, left, right, alibi, ALIBI, MASKED, EDGES)
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        if MASKED:  # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(s * scale_log2 - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@flash_autotune(
    {
        # the two fastest at D=64 causal, T 1k and 4k, tiles through TMA (H200: results/reference-h200/tma/tiles.csv)
        64: [tile_config(64, 64, 4, 3), tile_config(64, 128, 4, 3)],
        # first (the one tile below 4k): the fastest at D = 128 causal, T 512 / 1k / 2k, 16k tokens, H 16 (H200, TMA:
        # 0.170 / 0.225 / 0.356 ms against 0.200 / 0.259 / 0.381 for 128x64, reference-h200/short-tiles);
        # the other two: causal 4k 0.655 / 0.760 ms (reference-h200/tma-followup)
        128: [tile_config(64, 64, 4, 3), tile_config(128, 64, 8, 3), tile_config(128, 128, 8, 2)],
        256: [tile_config(128, 64, 8, 2)],
    },
    fp32=tile_config(32, 32, 4, 1),
    interpret=tile_config(32, 16, 4, 1),
)
@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE, SEQ_LENS, CU_SEQLENS, SLOPES, KV_NUM, KV_IDX,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    T, S, HQ, GROUP, stride_stats, left, right, scale_log2, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, ALIBI: tl.constexpr, HAS_SEQ_LENS: tl.constexpr,
    EDGES: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, SPARSE_BLOCK: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), B * Hq). q [B, T, Hq, D], k/v [B, S, Hkv, D], o [B, T, Hq, D],
    LSE [B, Hq, T] float32 (row stride stride_stats) in log2 units of the scaled scores (+inf for a
    row with no visible key). SPARSE_BLOCK > 0: block-sparse, visiting only the key blocks that
    KV_NUM, KV_IDX list (FlashProblem); BLOCK_M and BLOCK_N divide SPARSE_BLOCK.
    VARLEN: B = 1, the pack of the N sequences CU_SEQLENS [N + 1] bounds; grid (cdiv(longest,
    BLOCK_M), N * Hq), LSE per (head, row of the pack) (flash_tiles.sequence)."""
    block, bh, b, h, kv_h, first, T, S, kv_len, alibi = query_program(
        SEQ_LENS, CU_SEQLENS, SLOPES, T, S, HQ, GROUP, scale_log2, CAUSAL, HAS_SEQ_LENS, ALIBI, VARLEN
    )
    q_start = block * BLOCK_M
    if VARLEN:
        if q_start >= T:  # a sequence shorter than the longest has no rows in this block
            return
    Q += row_offset(b, first, stride_qb, stride_qt) + h * stride_qh
    # a sequence's tiles start 16-byte aligned where the pack's rows do (use_tma checks the row stride)
    K += row_offset(b, first, stride_kb, stride_kt) + kv_h * stride_kh
    V += row_offset(b, first, stride_vb, stride_vt) + kv_h * stride_vh
    K = tile_source(K, kv_len, stride_kt, HEAD_DIM, BLOCK_N, D_PAD, TMA)
    V = tile_source(V, kv_len, stride_vt, HEAD_DIM, BLOCK_N, D_PAD, TMA)
    rows = q_start + tl.arange(0, BLOCK_M)
    pos_q = rows + S - T
    q = load_rows(Q, rows, T, stride_qt, tl.arange(0, D_PAD), HEAD_DIM, stride_qd)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, full_lo, full_hi, hi = key_blocks(q_start, T, S, kv_len, left, right, BLOCK_M, BLOCK_N)
    LIST = KV_IDX
    if SPARSE_BLOCK:  # the same split, over the tiles of the key blocks listed for this tile's query block
        row = bh.to(tl.int64) * tl.cdiv(T, SPARSE_BLOCK) + q_start // SPARSE_BLOCK
        LIST = KV_IDX + row * tl.cdiv(S, SPARSE_BLOCK)
        lo, full_lo, full_hi, hi = listed_ranges(LIST, tl.load(KV_NUM + row), lo, full_lo, full_hi, hi, SPARSE_BLOCK, BLOCK_N)
    # the window's left edge, then tiles every row sees in full (no mask), then the diagonal/right edge
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
        lo, full_lo, kv_len, left, right, scale_log2, alibi,
        HEAD_DIM, D_PAD, ALIBI, True, EDGES, PRECISION, BLOCK_N, TMA, SPARSE_BLOCK,
    )
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
        full_lo, full_hi, kv_len, left, right, scale_log2, alibi,
        HEAD_DIM, D_PAD, ALIBI, False, EDGES, PRECISION, BLOCK_N, TMA, SPARSE_BLOCK,
    )
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, pos_q, K, V, LIST, stride_kt, stride_kd, stride_vt, stride_vd,
        full_hi, hi, kv_len, left, right, scale_log2, alibi,
        HEAD_DIM, D_PAD, ALIBI, True, EDGES, PRECISION, BLOCK_N, TMA, SPARSE_BLOCK,
    )

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    O += row_offset(b, first, stride_ob, stride_ot) + h * stride_oh
    store_rows(O, o, rows, T, stride_ot, tl.arange(0, D_PAD), HEAD_DIM, stride_od)
    tl.store(LSE + bh.to(tl.int64) * stride_stats + first + rows, lse, mask=rows < T)


def flash_forward(q, k, v, problem: FlashProblem):
    """o [B, T, Hq, D] (q's dtype) and lse [B, Hq, stats_row_length(T)] float32 (log2 units, for the
    backward; the first T of each row are written). Packed problems: B = 1, T = S = the pack.
    The problems flash_fwd_hopper.hopper_route takes run its warp-specialised kernel."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    o = empty((b, t, hq, d), q.dtype, q.device)
    lse = empty((b, hq, stats_row_length(t)), torch.float32, q.device)
    if hopper_route(problem, q, k, v) is None:
        flash_forward_hopper(q, k, v, o, lse, problem)
        return o, lse
    rows, sequences = problem.programs(b, t)

    def grid(meta):
        return (blocks(rows, meta["BLOCK_M"]), sequences * hq)

    flash_fwd_kernel[grid](
        q, k, v, o, lse, *problem.tensors(q), *problem.key_lists(q),
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        t, s, hq, hq // hkv, lse.stride(1), problem.left, problem.right, problem.scale_log2,
        TMA=use_tma(problem, k, v), **problem.launch_kwargs,
    )
    return o, lse
