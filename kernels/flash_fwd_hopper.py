"""The exact-softmax forward on Hopper, warp-specialised in Gluon (triton.experimental.gluon).

Work items are (query block of 64 rows per consumer, batch * query head), the longest causal blocks first
(across every head, or with HEAD_BY_HEAD each head's in turn, so the programs running at once share its keys
and values in L2), in groups of one, or with the plan's ``paired`` two (blocks n - 1 - i and i of a head: every
causal group the same number of key tiles); persistent (the plan's choice) one program per SM (the tile's per_sm) walks its share
of the groups, else one program per group. Each program runs in
partitions:
- a producer warpgroup (one warp issues) makes the TMA loads: each consumer's q rows per item, then k
  and v tiles into two rings of STAGES buffers each, every buffer with a "ready" barrier (the copy
  engine signals it) and an "empty" one (every consumer signals it); the rings run on across items, so
  the next item's first tiles load while the consumers finish this one;
- one, two or three consumer warpgroups (the plan's tile; one leaves room for two programs an SM), 64 query rows each, run
  the online softmax over the same key tiles with their tensor-core work kept in flight: while
  softmax(j) runs on the vector units, S(j+1) = q k(j+1)^T and O += P(j) v(j) are asynchronous
  wgmma (FlashAttention-3's intra-warpgroup overlap), P passed to the second GEMM from registers.
  With PINGPONG they take turns issuing their wgmma (one mbarrier each), so one's softmax overlaps the others' GEMMs
  (FlashAttention-3's inter-warpgroup ping-pong).

What kernels/flash_fwd.py computes, for the options this path takes (hopper_route says which):
o [B, T, Hq, D] and lse [B, Hq, T] float32 in log2 units of the scaled scores, causal or not,
GQA, any S >= T (queries aligned bottom-right), fp16/bf16, D 64 or 128. RoPE is applied before
any forward kernel (flash_rope), so it rides along. Everything else goes to the portable kernel, and so
do the problems it can take but was not measured faster on (PLANS: per head dim and mask, the plans by key length:
from which length each is on, with which tile, whether persistent and whether paired).
Tiles are read through host-side descriptors over the [B * T, H * D] view of each input, so a
tile may run past its sequence into the next one: keys past S are masked in the scores, and
query rows past T are never stored.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attnbench.kernels.flash_launch import NO_LIMIT, FlashKernel, FlashProblem, launch_signature, run_compiled

ROWS_PER_CONSUMER = 64  # one warpgroup's wgmma rows
# the TMA tile load: async_copy_global_to_shared in triton 3.6 (the GPU machine's), async_load from 3.7 on (which
# raises on the old name); the same arguments, descriptor, coordinates, barrier, destination
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
CONSUMER_WARPS = gl.constexpr(4)  # one warpgroup per consumer partition, and the producer's (one warp issues)


class HopperTile(NamedTuple):
    """A program's shape: BLOCK_N keys a tile, STAGES ring buffers, CONSUMERS warpgroups of 64 query rows,
    max_registers per thread at launch (per_sm programs an SM: per_sm x (CONSUMERS + 1) warpgroups x
    max_registers <= 512, and per_sm x shared_bytes within the SM's 227 KB) and consumer_registers after
    setmaxnreg (the producer's warpgroup keeps what is left); a persistent plan launches per_sm programs an SM."""

    block_n: int
    stages: int
    consumers: int
    max_registers: int
    consumer_registers: int
    per_sm: int = 1

    def shared_bytes(self, head_dim: int) -> int:
        """The 16-bit q buffers and k / v rings a program allocates (its barriers aside)."""
        return 2 * head_dim * (self.consumers * ROWS_PER_CONSUMER + 2 * self.stages * self.block_n)


# per head dim, the tiles the forward can take (PLANS picks one per mask) and tile_sweep times
# (the one-consumer tiles: two programs an SM, so one's q load, ring fill and epilogue overlap the other's tiles at
# short T, where one program an SM is latency-bound: PERF_NOTES 22, 25)
TILES = {
    64: [HopperTile(128, 3, 3, 128, 160), HopperTile(128, 3, 2, 168, 240), HopperTile(128, 2, 1, 128, 232, per_sm=2)],
    128: [HopperTile(128, 2, 2, 168, 240),  # three stages tied it, 64-key tiles lost (PERF_NOTES 22)
          HopperTile(64, 2, 1, 128, 232, per_sm=2)],
}
HEAD_DIMS = tuple(TILES)
# The consumers take turns issuing their wgmma (FlashAttention-3's ping-pong: one's softmax runs while the
# other's matrix products do); off, each issues as soon as its operands are ready
PINGPONG = True
# Work items head by head (each head's longest causal blocks first) instead of block by block across every head:
# at T 512 the blocks-first order read each head's k and v from DRAM once per query block (PERF_NOTES 19).
# Measured (H100, results/reference-h100/exposb-tiles/, PERF_NOTES 21): at D 128 faster than blocks first at every
# T 512-16k, causal and bidirectional (0.165 against 0.190 ms at causal T 512, 3.59 against 3.75 bidirectional 16k)
HEAD_BY_HEAD = True


@gluon.jit
def _pair(g, n_blocks, BH, HEAD_BY_HEAD: gl.constexpr):
    """Group g of PAIRED items: (batch * head, i), the group of query blocks n_blocks - 1 - i and i."""
    if HEAD_BY_HEAD:
        n_pairs = (n_blocks + 1) // 2
        bh = g // n_pairs
        i = g % n_pairs
    else:
        bh = g % BH
        i = g // BH
    return bh, i


@gluon.jit
def _work_groups(n_blocks, BH, PAIRED: gl.constexpr):
    """How many groups the n_blocks * BH work items form: one item each, or PAIRED two (_pair)."""
    groups = n_blocks * BH
    if PAIRED:
        groups = (n_blocks + 1) // 2 * BH
    return groups


@gluon.jit
def _group_items(g, n_blocks, BH, HEAD_BY_HEAD: gl.constexpr):
    """How many items PAIRED group g has: two, but one for the middle block of an odd n_blocks."""
    bh, i = _pair(g, n_blocks, BH, HEAD_BY_HEAD)
    return 1 + (2 * i + 1 < n_blocks).to(gl.int32)


@gluon.jit
def _work_item(g, half, n_blocks, BH, T, S, CAUSAL: gl.constexpr, BLOCK: gl.constexpr, BLOCK_N: gl.constexpr,
               HEAD_BY_HEAD: gl.constexpr, PAIRED: gl.constexpr):
    """Item ``half`` of work group g (query blocks of BLOCK rows, batch * query heads): one item a group, the
    longest causal blocks first, across every head or HEAD_BY_HEAD (then the items in flight at once read the
    same k and v tiles, which L2 serves); or PAIRED, a head's block n_blocks - 1 - i then block i, so that every
    causal group walks the same number of key tiles and a persistent program's share of them is balanced.
    Returns (batch * head, first query row, its position among the keys, key tiles to walk)."""
    if PAIRED:
        bh, i = _pair(g, n_blocks, BH, HEAD_BY_HEAD)
        block = i + (n_blocks - 1 - 2 * i) * (1 - half)
    elif HEAD_BY_HEAD:
        bh = g // n_blocks
        block = n_blocks - 1 - g % n_blocks
    else:
        bh = g % BH
        block = n_blocks - 1 - g // BH
    q_start = block * BLOCK
    pos_q0 = q_start + S - T
    n_tiles = gl.cdiv(S, BLOCK_N)
    if CAUSAL:
        n_tiles = gl.cdiv(gl.minimum(pos_q0 + BLOCK, S), BLOCK_N)  # every consumer walks them all: they share the ring
    return bh, q_start, pos_q0, n_tiles


@gluon.jit
def _load_tiles(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, barriers, work, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, HEAD_BY_HEAD: gl.constexpr, PAIRED: gl.constexpr):
    """The producer, per work item of this program (its share of the work groups, _work_item): each consumer's
    q rows once they all released the last item's, then its k and v tiles, each into a ring buffer once every
    consumer emptied it. The ring's count ``it`` runs on across items, so the next item's tiles load while the
    consumers finish this one."""
    n_blocks, BH = work[0], work[1]
    it = 0
    item = 0
    for g in range(gl.program_id(0), _work_groups(n_blocks, BH, PAIRED), gl.num_programs(0)):
        if PAIRED:
            for half in range(_group_items(g, n_blocks, BH, HEAD_BY_HEAD)):
                it, item = _load_item(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, barriers, work, g, half, it, item,
                                      CAUSAL, BLOCK_N, STAGES, HEAD_BY_HEAD, PAIRED)
        else:
            it, item = _load_item(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, barriers, work, g, 0, it, item,
                                  CAUSAL, BLOCK_N, STAGES, HEAD_BY_HEAD, PAIRED)


@gluon.jit
def _load_item(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, barriers, work, g, half, it, item, CAUSAL: gl.constexpr,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_BY_HEAD: gl.constexpr, PAIRED: gl.constexpr):
    """The producer's loads for item ``half`` of group g, this program's item-th, whose first key tile is the
    ring's it-th; returns (it, item) for the next."""
    q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, turns = barriers
    n_blocks, BH, T, S, HQ, GROUP = work
    ROWS: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    CONSUMERS: gl.constexpr = q_bufs.type.shape[0]
    bh, q_start, pos_q0, n_tiles = _work_item(g, half, n_blocks, BH, T, S, CAUSAL, ROWS * CONSUMERS, BLOCK_N, HEAD_BY_HEAD, PAIRED)
    b = bh // HQ
    h = bh % HQ
    mbarrier.wait(q_empty, (item & 1) ^ 1)  # a barrier starts with phase 1 complete: the first wait passes
    mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        _tma_load(q_desc, [b * T + q_start + c * ROWS, h * HEAD_DIM], q_bar, q_bufs.index(c))
    kv_row = b * S
    kv_col = (h // GROUP) * HEAD_DIM
    for j in range(n_tiles):
        stage = it % STAGES
        phase = (it // STAGES) & 1
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row + j * BLOCK_N, kv_col], k_ready.index(stage), k_bufs.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        _tma_load(v_desc, [kv_row + j * BLOCK_N, kv_col], v_ready.index(stage), v_bufs.index(stage))
        it += 1
    return it, item + 1


@gluon.jit
def _masked(s, j, first_masked, pos_q0, kv_len, CAUSAL: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Scores of key tile j with the keys a row may not see at -inf (tiles before first_masked: all visible)."""
    if j >= first_masked:
        keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = gl.expand_dims(keys < kv_len, 0)
        if CAUSAL:
            pos_q = pos_q0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
            visible = visible & (gl.expand_dims(keys, 0) <= gl.expand_dims(pos_q, 1))
        s = gl.where(visible, s, float("-inf"))
    return s


@gluon.jit
def _take_turn(turns, me: gl.constexpr, n, PINGPONG: gl.constexpr):
    """Wait until the consumer before this one (in a cycle) has issued its group of wgmma for turn n, or for
    consumer 0, the last one its turn n - 1 (a barrier starts with phase 1 complete: consumer 0's first passes)."""
    if PINGPONG:
        if me == 0:
            mbarrier.wait(turns.index(me), (n & 1) ^ 1)
        else:
            mbarrier.wait(turns.index(me), n & 1)


@gluon.jit
def _pass_turn(turns, me: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index((me + 1) % turns.type.shape[0]), count=1)


@gluon.jit
def _consume(me: gl.constexpr, smem, work, out, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
             PINGPONG: gl.constexpr, HEAD_BY_HEAD: gl.constexpr, PAIRED: gl.constexpr):
    """Consumer ``me``, per work item of this program (its share of the work groups, _work_item): query rows
    q_start + me * ROWS of the item's block, online softmax over its key tiles, then o (normalised) and the
    log2-sum-exp stored (_consume_item). smem: the q / k / v buffers and the barriers; work: the items' shape and
    the softmax scale; out: where o and lse go."""
    n_blocks, BH = work[0], work[1]
    it = 0  # the ring's count, as the producer's
    item = 0
    turn = 0
    for g in range(gl.program_id(0), _work_groups(n_blocks, BH, PAIRED), gl.num_programs(0)):
        if PAIRED:
            for half in range(_group_items(g, n_blocks, BH, HEAD_BY_HEAD)):
                it, item, turn = _consume_item(me, smem, work, out, g, half, it, item, turn, CAUSAL, BLOCK_N, HEAD_DIM, STAGES,
                                               PINGPONG, HEAD_BY_HEAD, PAIRED)
        else:
            it, item, turn = _consume_item(me, smem, work, out, g, 0, it, item, turn, CAUSAL, BLOCK_N, HEAD_DIM, STAGES,
                                           PINGPONG, HEAD_BY_HEAD, PAIRED)


@gluon.jit
def _consume_item(me: gl.constexpr, smem, work, out, g, half, it, item, turn, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, HEAD_BY_HEAD: gl.constexpr,
                  PAIRED: gl.constexpr):
    """Consumer ``me``'s item ``half`` of group g, this program's item-th, whose first key tile is the ring's it-th
    and first wgmma turn its turn-th: S(j) and O += P(j-1) v(j-1) are in flight while softmax(j-1)'s rescale and
    softmax(j) run; with PINGPONG the consumers take turns issuing them. Returns (it, item, turn) for the next."""
    q_bufs, k_bufs, v_bufs, barriers = smem
    n_blocks, BH, T, S, HQ, scale_log2 = work
    O, LSE, stride_ob, stride_ot, stride_oh, stride_stats = out
    q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, turns = barriers
    ROWS: gl.constexpr = q_bufs.type.shape[1]
    CONSUMERS: gl.constexpr = q_bufs.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_bufs.dtype
    q_smem = q_bufs.index(me)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    bh, q_start, pos_q0, n_tiles = _work_item(g, half, n_blocks, BH, T, S, CAUSAL, ROWS * CONSUMERS, BLOCK_N, HEAD_BY_HEAD, PAIRED)
    q_start += me * ROWS
    pos_q0 += me * ROWS
    first_masked = S // BLOCK_N  # the length edge
    if CAUSAL:
        first_masked = gl.minimum(first_masked, (pos_q0 + 1) // BLOCK_N)  # the first tile a row's diagonal cuts
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)

    mbarrier.wait(q_bar, item & 1)
    mbarrier.wait(k_ready.index(it % STAGES), (it // STAGES) & 1)
    _take_turn(turns, me, turn, PINGPONG)
    s_token = warpgroup_mma(q_smem, k_bufs.index(it % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    _pass_turn(turns, me, PINGPONG)
    turn += 1
    s = warpgroup_mma_wait(0, deps=(s_token,))
    mbarrier.arrive(k_empty.index(it % STAGES), count=1)
    s = _masked(s, 0, first_masked, pos_q0, S, CAUSAL, ROWS, BLOCK_N, s_layout)
    m_i = gl.max(s, 1) * scale_log2  # every row sees key 0 (S >= T, no padding): finite
    p = gl.exp2(s * scale_log2 - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, 1)
    for j in range(1, n_tiles):
        stage = (it + j) % STAGES
        prev = (it + j - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), ((it + j) // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((it + j - 1) // STAGES) & 1)
        _take_turn(turns, me, turn, PINGPONG)
        s_token = warpgroup_mma(q_smem, k_bufs.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        o_token = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
        _pass_turn(turns, me, PINGPONG)
        turn += 1
        s = warpgroup_mma_wait(1, deps=(s_token,))
        mbarrier.arrive(k_empty.index(stage), count=1)
        s = _masked(s, j, first_masked, pos_q0, S, CAUSAL, ROWS, BLOCK_N, s_layout)
        m_new = gl.maximum(m_i, gl.max(s, 1) * scale_log2)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc, p_op = warpgroup_mma_wait(0, deps=(o_token, p_op))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    mbarrier.arrive(q_empty, count=1)  # every S of the item is done: the producer may load the next item's q
    last = (it + n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((it + n_tiles - 1) // STAGES) & 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    _take_turn(turns, me, turn, PINGPONG)
    o_token = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
    _pass_turn(turns, me, PINGPONG)
    turn += 1
    acc = warpgroup_mma_wait(0, deps=(o_token,))
    mbarrier.arrive(v_empty.index(last), count=1)
    it += n_tiles
    item += 1

    b = bh // HQ
    h = bh % HQ
    rows = q_start + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    o_ptrs = O + b.to(gl.int64) * stride_ob + h * stride_oh + gl.expand_dims(rows, 1) * stride_ot + gl.expand_dims(cols, 0)
    gl.store(o_ptrs, o.to(dtype), mask=gl.expand_dims(rows < T, 1))
    lse_rows = q_start + gl.arange(0, ROWS, layout=l_i.type.layout)
    gl.store(LSE + bh.to(gl.int64) * stride_stats + lse_rows, m_i + gl.log2(l_i), mask=lse_rows < T)
    return it, item, turn


@gluon.jit
def flash_fwd_hopper_kernel(
    q_desc, k_desc, v_desc, O, LSE, stride_ob, stride_ot, stride_oh, T, S, BH, HQ, GROUP, stride_stats, scale_log2,
    CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
    CONSUMER_REGISTERS: gl.constexpr, PINGPONG: gl.constexpr, HEAD_BY_HEAD: gl.constexpr, PAIRED: gl.constexpr,
):
    """Grid (programs,): program p takes work groups p, p + programs, ... of the cdiv(T, 64 * CONSUMERS) query
    blocks times BH = B * Hq work items (_work_item: one item a group, the longest causal blocks first, across
    heads or HEAD_BY_HEAD; or PAIRED two, of equal causal cost together); programs = one per SM makes it
    persistent, one per group is the plain grid. q_desc over q as [B * T, Hq * D] (blocks of one consumer's rows), k_desc and
    v_desc over k, v as [B * S, Hkv * D]; o [B, T, Hq, D] (unit column stride), LSE as flash_fwd's. Launched with
    num_warps = CONSUMER_WARPS: the producer is the default partition, the CONSUMERS (1 to 3) are worker partitions."""
    ROWS: gl.constexpr = q_desc.block_type.shape[0]
    n_blocks = gl.cdiv(T, ROWS * CONSUMERS)

    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=CONSUMERS)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(turns.index(i), count=1)

    barriers = (q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, turns)
    smem = (q_bufs, k_bufs, v_bufs, barriers)
    work = (n_blocks, BH, T, S, HQ, scale_log2)
    out = (O, LSE, stride_ob, stride_ot, stride_oh, stride_stats)
    loads = (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, barriers, (n_blocks, BH, T, S, HQ, GROUP), CAUSAL, BLOCK_N, STAGES, HEAD_BY_HEAD, PAIRED)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_load_tiles, loads),
            (_consume, (gl.constexpr(0), smem, work, out, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, HEAD_BY_HEAD, PAIRED)),
        ], [CONSUMER_WARPS], [CONSUMER_REGISTERS])
    elif CONSUMERS == 2:
        gl.warp_specialize([
            (_load_tiles, loads),
            (_consume, (gl.constexpr(0), smem, work, out, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, HEAD_BY_HEAD, PAIRED)),
            (_consume, (gl.constexpr(1), smem, work, out, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, HEAD_BY_HEAD, PAIRED)),
        ], [CONSUMER_WARPS, CONSUMER_WARPS], [CONSUMER_REGISTERS, CONSUMER_REGISTERS])
    else:
        gl.warp_specialize([
            (_load_tiles, loads),
            (_consume, (gl.constexpr(0), smem, work, out, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, HEAD_BY_HEAD, PAIRED)),
            (_consume, (gl.constexpr(1), smem, work, out, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, HEAD_BY_HEAD, PAIRED)),
            (_consume, (gl.constexpr(2), smem, work, out, CAUSAL, BLOCK_N, HEAD_DIM, STAGES, PINGPONG, HEAD_BY_HEAD, PAIRED)),
        ], [CONSUMER_WARPS, CONSUMER_WARPS, CONSUMER_WARPS], [CONSUMER_REGISTERS, CONSUMER_REGISTERS, CONSUMER_REGISTERS])


def _rows_view(x: torch.Tensor) -> torch.Tensor | None:
    """x [B, L, H, D] as [B * L, H * D] without a copy, or None when its strides do not allow it."""
    b, length, h, d = x.shape
    sb, sl, sh, sd = x.stride()
    if sd != 1 or sh != d or (b > 1 and sb != length * sl):
        return None
    return x.as_strided((b * length, h * d), (sl, 1))


@functools.lru_cache(maxsize=None)
def _shared_layout(block_rows: int, head_dim: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The swizzled shared-memory layout of a [block_rows, head_dim] tile (cached: 6 us a call to build)."""
    return gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], gl.float16 if dtype == torch.float16 else gl.bfloat16)


def _descriptor(rows: torch.Tensor, block_rows: int, head_dim: int) -> TensorDescriptor:
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [block_rows, head_dim], _shared_layout(block_rows, head_dim, rows.dtype))


class HopperPlan(NamedTuple):
    """What the forward does for one (head dim, causal) from_keys keys on: tile, one of TILES[head dim];
    persistent, one program per SM (the tile's per_sm) walking its share of the work groups (the next item's loads overlap this
    one's end) instead of one program per group; paired, a group of query blocks n - 1 - i and i of a head
    (every causal group the same key tiles) instead of one block."""

    from_keys: int
    tile: HopperTile
    persistent: bool
    paired: bool = False


# Per (head dim, causal), the plans by from_keys, each on until the next one's from_keys (none: the portable
# kernel only). Measured on an H100 beside the portable kernel's tiles and the Hopper forward's other schedules
# (tile_sweep, T 512-16k; PERF_NOTES 21-23, results/reference-h100/persistent-heads/, deeper-rings/, pairs/):
# D 128 causal persistent and paired from 512 keys (1.11x one program per unpaired item at 1k, 1.06x at 4k),
# per item from 16k (1.02x the paired); D 128 bidirectional persistent (1.10x per item at 1k, 1.01x at 4k,
# even at 16k); D 64 bidirectional with two consumers and persistent, 1.17x the portable kernel's best tile at
# 512 keys to 1.02x at 16k; D 64 causal with two consumers, persistent and paired from 512 (1.02-1.03x the
# portable kernel at 512 and 1k), three consumers paired per group from 4k (1.06x the portable at 4k, 1.11x at 16k)
PLANS: dict[tuple[int, bool], tuple[HopperPlan, ...]] = {
    (64, True): (HopperPlan(512, TILES[64][1], True, True), HopperPlan(4096, TILES[64][0], False, True)),
    (64, False): (HopperPlan(512, TILES[64][1], True),),
    (128, True): (HopperPlan(512, TILES[128][0], True, True), HopperPlan(16384, TILES[128][0], False)),
    (128, False): (HopperPlan(512, TILES[128][0], True),),
}


def plans(from_keys: int | None, tile: HopperTile | None = None, persistent: bool | None = None,
          paired: bool | None = None) -> dict[tuple[int, bool], tuple[HopperPlan, ...]]:
    """PLANS with each head dim and mask's first plan on from from_keys (0: every problem the kernel can take,
    None: no plan, the portable kernel only), and ``tile`` (at its head dim), ``persistent`` and ``paired``
    in every plan where given (tests, tile_sweep)."""
    def changed(plan: HopperPlan, head_dim: int, first: bool) -> HopperPlan:
        return HopperPlan(from_keys if first else plan.from_keys, tile if tile in TILES[head_dim] else plan.tile,
                          plan.persistent if persistent is None else persistent, plan.paired if paired is None else paired)

    return {key: () if from_keys is None else tuple(changed(plan, key[0], i == 0) for i, plan in enumerate(taken))
            for key, taken in PLANS.items()}


def plan_for(head_dim: int, causal: bool, keys: int) -> HopperPlan | None:
    """The plan a forward over ``keys`` keys takes: its head dim and mask's last with from_keys <= keys (None: none)."""
    return next((plan for plan in reversed(PLANS[head_dim, causal]) if keys >= plan.from_keys), None)


EVERYWHERE = plans(0)  # every problem the kernel can take, each with its plans' tiles and schedules
NOWHERE = plans(None)  # the portable kernel only


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def hopper_route(problem: FlashProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 capability: tuple[int, int] | None = None) -> str | None:
    """Why this forward takes the portable kernel instead of the Hopper one, or None when it can take
    the Hopper one. capability: the GPU's (major, minor), default q's device's (a CPU tensor: none)."""
    if capability is None and not q.is_cuda:
        return "not on a GPU"
    if (capability or _capability(q.get_device()))[0] != 9:
        return "not a Hopper GPU"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype} inputs (16-bit only)"
    if problem.head_dim not in HEAD_DIMS:
        return f"head dim {problem.head_dim} (the Hopper path has {' and '.join(map(str, HEAD_DIMS))})"
    no_window = problem.left == NO_LIMIT and problem.right == (0 if problem.causal else NO_LIMIT)
    for option, present in (("key padding", problem.seq_lens is not None), ("packed sequences", problem.cu_seqlens is not None),
                            ("ALiBi", problem.slopes is not None), ("block-sparse lists", problem.sparse_block > 0),
                            ("a window", not no_window)):
        if present:
            return f"{option} (not on the Hopper path)"
    if q.shape[1] > k.shape[1]:
        return "more queries than keys"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if _rows_view(x) is None:
            return f"{name}'s strides (the Hopper path reads [B, L, H, D] as rows of H * D with unit head and column strides)"
        if x.data_ptr() % 16 or x.stride(1) % 8:
            return f"{name} is not 16-byte aligned"
    mask = "causal" if problem.causal else "bidirectional"
    taken = PLANS[problem.head_dim, problem.causal]
    if not taken:
        return f"the Hopper path is off at head dim {problem.head_dim}, {mask} (PLANS: not faster there)"
    if plan_for(problem.head_dim, problem.causal, k.shape[1]) is None:
        return f"{k.shape[1]} keys (the Hopper path is on from {taken[0].from_keys} at head dim {problem.head_dim}, {mask}: PLANS)"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def flash_forward_hopper(q, k, v, o, lse, problem: FlashProblem) -> None:
    """Writes o [B, T, Hq, D] and lse [B, Hq, >= T] (flash_fwd.flash_forward's outputs) for a problem hopper_route takes."""
    b, t, hq, d = q.shape
    plan = plan_for(d, problem.causal, k.shape[1])
    blocks = triton.cdiv(t, ROWS_PER_CONSUMER * plan.tile.consumers)
    groups = (triton.cdiv(blocks, 2) if plan.paired else blocks) * b * hq
    grid = min(groups, _sm_count(q.get_device()) * plan.tile.per_sm) if plan.persistent else groups
    _launch(grid, *launch_arguments(q, k, v, o, lse, problem.scale_log2, problem.causal, plan))


def launch_arguments(q, k, v, o, lse, scale_log2: float, causal: bool, plan: HopperPlan) -> tuple[tuple, dict, dict]:
    """flash_fwd_hopper_kernel's (arguments, constexprs, compile options) for q, k, v, o, lse as
    flash_forward_hopper's, under ``plan`` (devtools.hopper_sass compiles from them on any machine)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    tile = plan.tile
    args = (
        _descriptor(_rows_view(q), ROWS_PER_CONSUMER, d), _descriptor(_rows_view(k), tile.block_n, d), _descriptor(_rows_view(v), tile.block_n, d),
        o, lse, o.stride(0), o.stride(1), o.stride(2), t, s, b * hq, hq, hq // hkv, lse.stride(1), scale_log2,
    )
    constexprs = dict(
        CAUSAL=causal, HEAD_DIM=d, BLOCK_N=tile.block_n, STAGES=tile.stages, CONSUMERS=tile.consumers,
        CONSUMER_REGISTERS=tile.consumer_registers, PINGPONG=PINGPONG, HEAD_BY_HEAD=HEAD_BY_HEAD, PAIRED=plan.paired,
    )
    return args, constexprs, dict(num_warps=CONSUMER_WARPS.value, maxnreg=tile.max_registers)


COMPILED: dict[tuple, object] = {}  # _launch's key -> the CompiledKernel its first launch returned


def _launch(grid: int, args: tuple, constexprs: dict, options: dict) -> None:
    """flash_fwd_hopper_kernel[(grid,)](*args, **constexprs, **options); later launches with the same key call
    the CompiledKernel the first returned directly (flash_launch.run_compiled: no JITFunction.run binding and
    specialising the arguments, tens of microseconds of host time, as FlashKernel does). The key is a superset of
    what triton specialises on: the three descriptors' blocks, shapes and strides, the options, and
    flash_launch.launch_signature of the rest (o's device and dtype, o's and lse's 16-byte alignment, every
    scalar's value, the constexprs)."""
    key = (
        *options.values(), *[(*x.block_shape, *x.shape, *x.strides) for x in args[:3]],
        *launch_signature(args[3:], constexprs, 2),
    )
    kernel = COMPILED.get(key)
    if kernel is not None:
        run_compiled(kernel, (grid, 1, 1), (*args, *[constexprs[name] for name in flash_fwd_hopper_kernel.arg_names[len(args):]]))
        return
    kernel = flash_fwd_hopper_kernel[(grid,)](*args, **constexprs, **options)
    if len(COMPILED) >= FlashKernel.MAX_SIGNATURES:
        COMPILED.clear()
    COMPILED[key] = kernel
