"""The dk/dv half of the exact-softmax backward on Hopper, in Gluon (off by default: PERF_NOTES 24).

One program per KEYS keys of a kv head (one warpgroup per 64 keys, its wgmma rows the keys: KEYS 128 is FA3's
layout, two warpgroups sharing each q and dO tile), k and v read once into shared memory by TMA, then over the
query tiles of BLOCK_M rows of each q head of its GQA group, q and dO tiles through a TMA ring (a tile's stage
loads the tile STAGES on once its products are done). Per tile, scores kept transposed
([keys, queries], as kernels/flash_bwd.py's dk/dv kernel), all four products wgmma:
  S^T = K Q^T and dP^T = V dO^T in flight together (asynchronous), then P^T = exp2(S^T scale_log2 - lse),
  dS^T = P^T (dP^T - delta), and dV += P^T dO, dK += dS^T Q with P^T and dS^T fed from registers.
lse and delta are what the forward and the dq kernel wrote (flash_bwd.flash_backward runs dq first). The
problems it takes (flash_dkdv_hopper.hopper_dkdv_route): 16-bit, D 64 or 128, causal or not, GQA, S >= T, no
padding, packing, ALiBi, window, block lists or RoPE (those stay on the portable kernel).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from attnbench.kernels.flash_fwd_hopper import _descriptor, _rows_view, _tma_load, hopper_route
from attnbench.kernels.flash_launch import FlashProblem

BLOCK_M = 64  # query rows a tile


class DkdvTile(NamedTuple):
    """How a program runs: ``keys`` keys (64 a warpgroup: 64 or 128), a ring of ``stages`` q and dO tiles, and
    ``pipelined``: tile t + 1's S^T and dP^T are issued before tile t's dV, dK products, so tile t + 1's
    elementwise work runs while the tensor cores do tile t's updates (FA3's intra-warpgroup overlap; it holds
    one more tile's P^T and dS^T in registers and needs a third stage to keep a load in flight)."""

    keys: int
    stages: int
    pipelined: bool


TILES = (DkdvTile(64, 2, False), DkdvTile(128, 2, False), DkdvTile(64, 3, True), DkdvTile(128, 3, True))  # dkdv_timing times each
TILE = {64: TILES[0], 128: TILES[0]}  # per head dim


@gluon.jit
def _load_tile(q_desc, do_desc, q_bufs, do_bufs, ready, t, b, kv_h, T, GROUP, per_head, first_tile,
               HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """Tile t's q and dO rows (q head kv_h * GROUP + t // per_head, query tile first_tile + t % per_head) into
    stage t % STAGES, ready[stage] counting their bytes."""
    ROWS: gl.constexpr = q_desc.block_type.shape[0]
    TILE_BYTES: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes
    stage = t % STAGES
    h = kv_h * GROUP + t // per_head
    row = b * T + (first_tile + t % per_head) * ROWS
    mbarrier.expect(ready.index(stage), TILE_BYTES)
    _tma_load(q_desc, [row, h * HEAD_DIM], ready.index(stage), q_bufs.index(stage))
    _tma_load(do_desc, [row, h * HEAD_DIM], ready.index(stage), do_bufs.index(stage))


@gluon.jit
def _issue_scores(k_smem, v_smem, q_bufs, do_bufs, ready, t, zero_s, STAGES: gl.constexpr):
    """Waits for tile t's q and dO, then issues S^T = K Q^T and dP^T = V dO^T (asynchronous): their tokens."""
    stage = t % STAGES
    mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
    s_token = warpgroup_mma(k_smem, q_bufs.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dp_token = warpgroup_mma(v_smem, do_bufs.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    return s_token, dp_token


@gluon.jit
def _issue_updates(p_op, ds_op, q_bufs, do_bufs, t, dv, dk, STAGES: gl.constexpr):
    """Issues tile t's dV += P^T dO and dK += dS^T Q (asynchronous): their tokens."""
    stage = t % STAGES
    dv_token = warpgroup_mma(p_op, do_bufs.index(stage), dv, is_async=True)
    dk_token = warpgroup_mma(ds_op, q_bufs.index(stage), dk, is_async=True)
    return dv_token, dk_token


@gluon.jit
def _score_gradients(s_token, dp_token, LSE, DELTA, t, b, kv_h, keys, T, S, HQ, GROUP, per_head, first_tile, stride_stats,
                     scale_log2, CAUSAL: gl.constexpr, PENDING: gl.constexpr, ROWS: gl.constexpr, s_layout: gl.constexpr,
                     a_layout: gl.constexpr, dtype: gl.constexpr):
    """Tile t's P^T = exp2(S^T scale_log2 - lse) and dS^T = P^T (dP^T - delta), [keys, ROWS], as wgmma A operands;
    PENDING later wgmma groups may stay in flight when S^T and dP^T are taken."""
    h = kv_h * GROUP + t // per_head
    rows = (first_tile + t % per_head) * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
    stats = (b * HQ + h).to(gl.int64) * stride_stats + rows
    lse = gl.load(LSE + stats, mask=rows < T, other=0.0)
    delta = gl.load(DELTA + stats, mask=rows < T, other=0.0)
    visible = gl.expand_dims(keys < S, 1) & gl.expand_dims(rows < T, 0)
    if CAUSAL:
        visible = visible & (gl.expand_dims(keys, 1) <= gl.expand_dims(rows + S - T, 0))
    s = warpgroup_mma_wait(PENDING + 1, deps=(s_token,))
    p = gl.where(visible, gl.exp2(s * scale_log2 - gl.expand_dims(lse, 0)), 0.0)
    dp = warpgroup_mma_wait(PENDING, deps=(dp_token,))
    ds = p * (dp - gl.expand_dims(delta, 0))
    return gl.convert_layout(p.to(dtype), a_layout), gl.convert_layout(ds.to(dtype), a_layout)


@gluon.jit
def flash_dkdv_hopper_kernel(
    q_desc, k_desc, v_desc, do_desc, DK, DV, LSE, DELTA, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    T, S, HQ, HKV, GROUP, stride_stats, scale, scale_log2,
    CAUSAL: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PIPELINED: gl.constexpr,
):
    """Grid (cdiv(S, KEYS), B * Hkv), KEYS // 16 warps: dk, dv [B, S, Hkv, D] (unit column stride) summed over the GROUP q heads
    of each kv head. q_desc, do_desc over q, dO as [B * T, Hq * D] (blocks of BLOCK_M rows), k_desc, v_desc over
    k, v as [B * S, Hkv * D] (blocks of KEYS rows); LSE, DELTA [B, Hq, >= T] float32 (log2 units of the scaled
    scores, and rowsum(dO * O)); STAGES, PIPELINED as DkdvTile's."""
    ROWS: gl.constexpr = q_desc.block_type.shape[0]
    KEYS: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    b = gl.program_id(1) // HKV
    kv_h = gl.program_id(1) % HKV
    k_start = gl.program_id(0) * KEYS

    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    q_bufs = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_bufs = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    KV_BYTES: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    mbarrier.expect(kv_bar, KV_BYTES)
    _tma_load(k_desc, [b * S + k_start, kv_h * HEAD_DIM], kv_bar, k_smem)
    _tma_load(v_desc, [b * S + k_start, kv_h * HEAD_DIM], kv_bar, v_smem)

    WARPS: gl.constexpr = KEYS // 16  # 4 a warpgroup, each its 64 keys' rows of S^T, dP^T, dk and dv
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, ROWS, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    zero_s = gl.zeros([KEYS, ROWS], gl.float32, layout=s_layout)
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=acc_layout)
    keys = k_start + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))

    # the query tiles a key block sees: causal, from the tile holding the first query at or after k_start; as
    # k_start < S, that tile is below cdiv(T, ROWS), so every program has GROUP tiles at least
    first_tile = 0
    if CAUSAL:
        first_tile = gl.maximum(k_start - (S - T), 0) // ROWS
    per_head = gl.cdiv(T, ROWS) - first_tile
    total = GROUP * per_head
    tiles = (q_desc, do_desc, q_bufs, do_bufs, ready)
    where = (b, kv_h, T, GROUP, per_head, first_tile)
    stats = (LSE, DELTA)
    gradients = (b, kv_h, keys, T, S, HQ, GROUP, per_head, first_tile, stride_stats, scale_log2, CAUSAL)
    for i in gl.static_range(STAGES):
        if i < total:
            _load_tile(*tiles, i, *where, HEAD_DIM, STAGES)
    mbarrier.wait(kv_bar, 0)
    s_token, dp_token = _issue_scores(k_smem, v_smem, q_bufs, do_bufs, ready, 0, zero_s, STAGES)
    p_op, ds_op = _score_gradients(s_token, dp_token, *stats, 0, *gradients, 0, ROWS, s_layout, a_layout, dtype)
    for t in range(total - 1):  # tile t's dV, dK updates and tile t + 1's scores and their gradients
        if PIPELINED:  # tile t + 1's scores first, their gradients while tile t's updates run
            s_token, dp_token = _issue_scores(k_smem, v_smem, q_bufs, do_bufs, ready, t + 1, zero_s, STAGES)
        dv_token, dk_token = _issue_updates(p_op, ds_op, q_bufs, do_bufs, t, dv, dk, STAGES)
        if PIPELINED:
            p_next, ds_next = _score_gradients(s_token, dp_token, *stats, t + 1, *gradients, 2, ROWS, s_layout, a_layout, dtype)
        dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_token, dk_token, p_op, ds_op))
        if t + STAGES < total:  # tile t's stage is free
            _load_tile(*tiles, t + STAGES, *where, HEAD_DIM, STAGES)
        if not PIPELINED:
            s_token, dp_token = _issue_scores(k_smem, v_smem, q_bufs, do_bufs, ready, t + 1, zero_s, STAGES)
            p_next, ds_next = _score_gradients(s_token, dp_token, *stats, t + 1, *gradients, 0, ROWS, s_layout, a_layout, dtype)
        p_op, ds_op = p_next, ds_next
    dv_token, dk_token = _issue_updates(p_op, ds_op, q_bufs, do_bufs, total - 1, dv, dk, STAGES)
    dv, dk = warpgroup_mma_wait(0, deps=(dv_token, dk_token))

    # d(score)/dk carries the softmax scale; the scores' log2(e) is already undone by exp2
    dk = dk * scale
    out_keys = k_start + gl.arange(0, KEYS, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout)), 0)
    stored = gl.expand_dims(out_keys < S, 1)
    dk_ptrs = DK + b.to(gl.int64) * stride_dkb + kv_h * stride_dkh + gl.expand_dims(out_keys, 1) * stride_dkt + cols
    dv_ptrs = DV + b.to(gl.int64) * stride_dvb + kv_h * stride_dvh + gl.expand_dims(out_keys, 1) * stride_dvt + cols
    gl.store(dk_ptrs, dk.to(dtype), mask=stored)
    gl.store(dv_ptrs, dv.to(dtype), mask=stored)


HOPPER_DKDV = False  # off until timed beside the portable kernel (kernels/flash_bwd.py) on a GPU


def hopper_dkdv_route(problem: FlashProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dk: torch.Tensor,
                      dv: torch.Tensor, capability: tuple[int, int] | None = None) -> str | None:
    """Why the dk/dv half takes the portable kernel, or None when it can take this one: the Hopper forward's
    conditions (flash_fwd_hopper.hopper_route, its length plans aside), no RoPE (dk is rotated back in the
    portable kernel), dO's strides as q's may be, dk and dv with unit column strides."""
    if not HOPPER_DKDV:
        return "HOPPER_DKDV is off (not yet timed)"
    reason = hopper_route(problem, q, k, v, capability)
    if reason is not None and "keys (the Hopper path is on from" not in reason:
        return reason
    if problem.rope:
        return "RoPE (dk is rotated back on the portable kernel)"
    if _rows_view(do) is None or do.data_ptr() % 16 or do.stride(1) % 8:
        return "dO's strides or alignment"
    if dk.stride(-1) != 1 or dv.stride(-1) != 1:
        return "dk or dv without unit column stride"
    return None


def launch_arguments(q, k, v, do, dk, dv, lse, delta, problem: FlashProblem, tile: DkdvTile) -> tuple[tuple, tuple, dict, dict]:
    """flash_dkdv_hopper_kernel's (grid, arguments, constexprs, compile options) for flash_dkdv_hopper's tensors under ``tile``."""
    if tile.keys not in (64, 128):
        raise ValueError(f"keys a program: 64 or 128 (one or two warpgroups), not {tile.keys}")
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    args = (
        _descriptor(_rows_view(q), BLOCK_M, d), _descriptor(_rows_view(k), tile.keys, d), _descriptor(_rows_view(v), tile.keys, d),
        _descriptor(_rows_view(do), BLOCK_M, d), dk, dv, lse, delta, *dk.stride()[:3], *dv.stride()[:3],
        t, s, hq, hkv, hq // hkv, lse.stride(1), problem.scale, problem.scale_log2,
    )
    constexprs = dict(CAUSAL=problem.causal, HEAD_DIM=d, STAGES=tile.stages, PIPELINED=tile.pipelined)
    return (triton.cdiv(s, tile.keys), b * hkv), args, constexprs, dict(num_warps=tile.keys // 16)


def flash_dkdv_hopper(q, k, v, do, dk, dv, lse, delta, problem: FlashProblem) -> None:
    """Writes dk, dv [B, S, Hkv, D] for a problem hopper_dkdv_route takes, under TILE[D]; lse, delta as flash_backward's."""
    grid, args, constexprs, options = launch_arguments(q, k, v, do, dk, dv, lse, delta, problem, TILE[q.shape[-1]])
    flash_dkdv_hopper_kernel[grid](*args, **constexprs, **options)
