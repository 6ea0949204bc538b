"""Split-KV (flash-decoding) softmax attention for a decode step against a KV cache.

A decode step reads the whole cache to produce a few query rows, so it is bound by the cache's
bytes, and a grid of one program per (sequence, kv head) leaves most SMs idle at small batch.
So the cache is cut along its keys into splits: one program per (sequence, kv head, split)
computes the softmax over its keys, and their log-sum-exp, for the query rows of that kv head
(GQA packing: the Hq / Hkv query heads of one kv head, times the N new queries, are the rows of
one tile, so the cache is read once for all of them), and a second kernel combines the splits,
each weighted by its share of the total exp-sum. With one split the first kernel writes o itself. Paged and contiguous caches go through one code path: a contiguous cache
[B, L, Hkv, D] is the paged one whose page is the whole sequence (page size L, page table
[[0], [1], ...]), and a rolling cache for a sliding window is either one with positions taken
modulo its rows. Fused: ALiBi biases, sliding windows (only the window's tiles are read), and
RoPE on q (the cache holds rotated keys). Semantics, and the plain-torch twin: models/decode.py
(softmax_step).
Tile helpers shared with the flash kernels: kernels/flash_tiles.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnbench.kernels.flash import _rope_tables  # cos, sin by position, shared with the flash kernels' RoPE
from attnbench.kernels.flash_launch import NO_LIMIT, blocks, empty
from attnbench.kernels.flash_tiles import INTERPRET, LEFT_EDGE, LENGTH_EDGE, RIGHT_EDGE, alibi_slope, mma, score_tile


@triton.jit
def _cache_rows(TABLE, b, keys, stride_tb, stride_tp, page, capacity, valid):
    """Where the keys at positions ``keys`` of sequence b live: row r = key % capacity of its cache
    (a rolling cache wraps; otherwise r = key), i.e. (page slot TABLE[b, r // page], row r % page),
    both int64; keys outside ``valid`` read table entry 0 (they are never loaded)."""
    r = keys % capacity
    slot = tl.load(TABLE + b.to(tl.int64) * stride_tb + (r // page) * stride_tp, mask=valid, other=0)
    return slot.to(tl.int64), (r % page).to(tl.int64)


@triton.jit
def _rotated(q, q_ptrs, COS, SIN, pos_q, stride_angle, stride_qd, real, cols, HEAD_DIM: tl.constexpr):
    """q [BLOCK_M, D_PAD] rotated by RoPE (rotate-half) at its rows' positions pos_q, in float32:
    column j < D/2 becomes q_j cos - q_{j+D/2} sin, column j + D/2 becomes q_{j+D/2} cos + q_j sin."""
    half = HEAD_DIM // 2
    first = cols < half
    partner = tl.where(first, half, -half)  # column offset of the pair's other half
    inside = real[:, None] & (cols < HEAD_DIM)[None, :]
    other = tl.load(q_ptrs + partner[None, :] * stride_qd, mask=inside, other=0.0).to(tl.float32)
    angle = pos_q[:, None].to(tl.int64) * stride_angle + (cols % half)[None, :]
    cos = tl.load(COS + angle, mask=inside, other=0.0)
    sin = tl.load(SIN + angle, mask=inside, other=0.0)
    return (q.to(tl.float32) * cos + tl.where(first, -1.0, 1.0)[None, :] * other * sin).to(q.dtype)


@triton.jit
def _split_kernel(
    Q, K, V, TABLE, LENGTHS, SLOPES, COS, SIN, O, O_PART, LSE_PART,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_tb, stride_tp, stride_angle, page, capacity, N, HKV, ROW_BLOCKS, left, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ALIBI: tl.constexpr, ROPE: tl.constexpr, EDGES: tl.constexpr,
    PRECISION: tl.constexpr, ONE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B, Hkv * ROW_BLOCKS, splits). q [B, N, Hq, D]; k/v pages [P, page, Hkv, D]; TABLE int32
    [B, max_pages]; LENGTHS int32 [B]. The M = N * GROUP rows of kv head kv_h, in blocks of BLOCK_M:
    row r is query n = r // GROUP of query head kv_h * GROUP + r % GROUP.
    ONE_SPLIT: o [B, N, Hq, D]; otherwise each split's own softmax result O_PART float32
    [B, Hkv, splits, M, D] (M = N * GROUP; 0 for a row that sees no key of the split) and its
    log-sum-exp LSE_PART float32 [B, Hkv, splits, M] (log2 units of the scaled scores; -inf there)."""
    b = tl.program_id(0)
    kv_h = tl.program_id(1) // ROW_BLOCKS
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    length = tl.load(LENGTHS + b)
    rows = tl.program_id(1) % ROW_BLOCKS * BLOCK_M + tl.arange(0, BLOCK_M)
    n = rows // GROUP
    h = kv_h * GROUP + rows % GROUP
    real = rows < N * GROUP
    pos_q = length - N + n
    cols = tl.arange(0, D_PAD)
    in_head = cols < HEAD_DIM
    q_ptrs = Q + b.to(tl.int64) * stride_qb + n[:, None] * stride_qt + h[:, None] * stride_qh + cols[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=real[:, None] & in_head[None, :], other=0.0)  # stays in registers for the whole loop
    if ROPE:
        q = _rotated(q, q_ptrs, COS, SIN, pos_q, stride_angle, stride_qd, real, cols, HEAD_DIM)
    if ALIBI:
        slope = alibi_slope(SLOPES, h, scale_log2, ALIBI)[:, None]
    else:
        slope = 0.0

    # the keys some new query sees, [lo, length), cut into splits of whole tiles; a split past the
    # end (short sequences of a ragged batch) is empty and writes lse = -inf
    lo = tl.maximum(length - N - left, 0) // BLOCK_N * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(length - lo, splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    stop = tl.minimum(start + chunk, length)

    K += kv_h * stride_kh
    V += kv_h * stride_vh
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for k_start in range(start, stop, BLOCK_N):
        keys = k_start + tl.arange(0, BLOCK_N)
        inside = keys < stop
        loaded = inside[:, None] & in_head[None, :]
        slot, row = _cache_rows(TABLE, b, keys, stride_tb, stride_tp, page, capacity, inside)  # one table read for k and v
        k_rows = slot * stride_kp + row * stride_kr
        v_rows = slot * stride_vp + row * stride_vr
        k = tl.load(K + k_rows[:, None] + cols[None, :] * stride_kd, mask=loaded, other=0.0)
        v = tl.load(V + v_rows[:, None] + cols[None, :] * stride_vd, mask=loaded, other=0.0)
        s = mma(q, tl.trans(k), None, PRECISION)
        s = score_tile(s, pos_q[:, None], keys[None, :], stop, left, 0, slope, ALIBI, True, EDGES)
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new

    seen = l_i > 0.0  # always, with one split: every query sees its own key
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    if ONE_SPLIT:
        o_ptrs = O + b.to(tl.int64) * stride_ob + n[:, None] * stride_ot + h[:, None] * stride_oh + cols[None, :] * stride_od
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=real[:, None] & in_head[None, :])
    else:
        m = N * GROUP
        part = (b * HKV + kv_h) * splits + split
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + part.to(tl.int64) * m + rows, lse, mask=real)
        part_ptrs = O_PART + (part.to(tl.int64) * m + rows[:, None]) * HEAD_DIM + cols[None, :]
        tl.store(part_ptrs, o, mask=real[:, None] & in_head[None, :])


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, O, stride_ob, stride_ot, stride_oh, stride_od, splits, N,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (B, Hkv, N * GROUP): output row r of every split, weighted by its share of the
    softmax's total, o = sum_s 2^(lse_s - top) o_s / sum_s 2^(lse_s - top), top = max_s lse_s.
    Splits are read BLOCK_S at a time as one tile, so no load waits on another."""
    b = tl.program_id(0)
    kv_h = tl.program_id(1)
    row = tl.program_id(2)
    m = N * GROUP
    first = ((b * tl.num_programs(1) + kv_h) * splits).to(tl.int64)
    every = tl.arange(0, SPLITS_PAD)
    lse = tl.load(LSE_PART + (first + every) * m + row, mask=every < splits, other=float("-inf"))
    top = tl.max(lse, 0)  # finite: the row's own key is in some split
    total = tl.sum(tl.math.exp2(lse - top), 0)  # an empty split weighs 0
    cols = tl.arange(0, D_PAD)
    in_head = cols < HEAD_DIM
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for s_start in range(0, splits, BLOCK_S):
        some = s_start + tl.arange(0, BLOCK_S)
        inside = some < splits
        weight = tl.math.exp2(tl.load(LSE_PART + (first + some) * m + row, mask=inside, other=float("-inf")) - top)
        parts = tl.load(
            O_PART + ((first + some) * m + row)[:, None] * HEAD_DIM + cols[None, :], mask=inside[:, None] & in_head[None, :], other=0.0
        )
        acc += tl.sum(weight[:, None] * parts, 0)
    n = row // GROUP
    h = kv_h * GROUP + row % GROUP
    o_ptrs = O + b.to(tl.int64) * stride_ob + n * stride_ot + h * stride_oh + cols * stride_od
    tl.store(o_ptrs, (acc / total).to(O.dtype.element_ty), mask=in_head)


MAX_SPLITS = 128
MIN_SPLIT_KEYS = 128  # below this a split's share of the cache no longer pays for its partial result (H200, B = 1,
# L = 1k: 8 splits of 128 keys 8.0 us, 4 of 256 11.3 us; results/reference-h200/decode-tune/)
# programs per SM at once: the bf16 D = 128 split kernel compiles (triton 3.9, sm_90a, ptxas -v) to
# 124 registers a thread at 4 warps and 39 KB of shared memory, so four fit an SM; and HBM at ~4.8
# TB/s with ~1 us of latency needs ~36 KB in flight per SM of the H200's 132 (not yet measured)
RESIDENT = 4
H200_SMS = 132  # what the interpreter (and a dry run) assumes, so tests take the GPU's split choices


@functools.lru_cache(maxsize=256)  # host time counts at small batch, where decode is launch-bound
def split_count(programs: int, keys: int, sms: int) -> int:
    """How many splits to cut ``keys`` cache keys into when ``programs`` programs (sequences x kv
    heads x row blocks) share them and the GPU has ``sms`` SMs: the fewest whose programs fill the
    SMs' resident slots in waves at least 85% full (FlashAttention's num_splits_heuristic), each
    split at least MIN_SPLIT_KEYS keys. On an H200 with Hkv = 8: B = 64 gets 1, B = 32 2, B = 8 7-8,
    B = 1 up to 66 (at 16k keys and more)."""
    slots = RESIDENT * sms
    most = max(1, min(MAX_SPLITS, keys // MIN_SPLIT_KEYS))

    def efficiency(splits: int) -> float:
        waves = programs * splits / slots
        return waves / -(-waves // 1)

    best = max(efficiency(s) for s in range(1, most + 1))
    return next(s for s in range(1, most + 1) if efficiency(s) >= 0.85 * best)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The SMs of CUDA device ``device``; H200_SMS elsewhere (the interpreter)."""
    return H200_SMS if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=16)
def _identity_table(batch: int, device: torch.device) -> torch.Tensor:
    """The page table of a contiguous cache read as paged with one page per sequence: [[0], [1], ...]."""
    return torch.arange(batch, dtype=torch.int32, device=device)[:, None]


def _tile(dtype: torch.dtype, rows: int) -> dict:
    """Block sizes and launch options: BLOCK_M query rows (>= 16 for tl.dot), BLOCK_N keys."""
    block_m = min(max(16, triton.next_power_of_2(rows)), 64)
    if INTERPRET:
        return {"BLOCK_M": block_m, "BLOCK_N": 16}
    if dtype == torch.float32:
        return {"BLOCK_M": block_m, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    # two stages beat three at every B and L timed (H200, B 1 and 32, L 1k-64k: 3-5% at B = 32 and L >= 16k;
    # results/reference-h200/decode-tune/); 128-key tiles win only where they halve the splits
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def _launch(q, k_pages, v_pages, table, page, lengths, slopes, rope_tables, left, scale, splits, tile=None) -> torch.Tensor:
    """o [B, N, Hq, D]: the split kernel over (table, page) pages, then the combine kernel unless one split."""
    b, n, hq, d = q.shape
    hkv = k_pages.shape[2]
    group = hq // hkv
    tile = {**_tile(q.dtype, n * group), **(tile or {})}
    row_blocks = blocks(n * group, tile["BLOCK_M"])
    if splits is None:
        keys = table.shape[1] * page if left >= NO_LIMIT else min(table.shape[1] * page, left + n)
        splits = split_count(b * hkv * row_blocks, keys, sm_count(q.device))
    o = empty((b, n, hq, d), q.dtype, q.device)
    if splits == 1:
        o_part = lse_part = o  # never read
    else:
        o_part = empty((b, hkv, splits, n * group, d), torch.float32, q.device)
        lse_part = empty((b, hkv, splits, n * group), torch.float32, q.device)
    edges = RIGHT_EDGE.value | LENGTH_EDGE.value | (LEFT_EDGE.value if left < NO_LIMIT else 0)
    _split_kernel[(b, hkv * row_blocks, splits)](
        q, k_pages, v_pages, table, lengths, q if slopes is None else slopes, *(rope_tables or (q, q)), o, o_part, lse_part,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *o.stride(), *table.stride(),
        (rope_tables or (q,))[0].stride(0), page, table.shape[1] * page, n, hkv, row_blocks, left, scale * 1.4426950408889634,
        GROUP=group, HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), ALIBI=slopes is not None, ROPE=rope_tables is not None,
        EDGES=edges,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ONE_SPLIT=splits == 1, **tile,
    )
    if splits > 1:
        _combine_kernel[(b, hkv, n * group)](
            o_part, lse_part, o, *o.stride(), splits, n,
            GROUP=group, HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)), SPLITS_PAD=triton.next_power_of_2(splits), BLOCK_S=16,
        )
    return o


def _rope_positions(rows: int, lengths: torch.Tensor, window: int | None) -> int:
    """Positions the RoPE tables must cover: the cache's rows, or on a rolling cache (a window: lengths
    may pass the rows) up to the longest sequence, rounded up to a power of two so that the cached
    tables serve many steps (reading lengths synchronises: only then)."""
    if window is None:
        return rows
    return max(rows, triton.next_power_of_2(int(lengths.max())))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    page_table: torch.Tensor | None = None,
    window: int | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    scale: float | None = None,
    splits: int | None = None,
    tile: dict | None = None,
) -> torch.Tensor:
    """One decode step of softmax attention against a KV cache: o [B, N, Hq, D] in q's dtype.

    q [B, N, Hq, D]: the N new queries of each sequence (any strides), Hq a multiple of Hkv.
    k_cache, v_cache: contiguous [B, L, Hkv, D], or with page_table int [B, max_pages] a pool of
    pages [P, page, Hkv, D] (token j of sequence b in row j % page of page page_table[b, j // page]);
    any strides, D contiguous is fastest. The cache has C rows per sequence (L, or max_pages *
    page) and holds position j in row j % C. lengths int [B]: tokens in each sequence's cache,
    the N new ones (already appended) included, N <= lengths[b] <= C, or any length with a window
    and window + N <= C (a rolling cache; not checked: that would synchronise). Query n of sequence b sits at position lengths[b] - N + n and sees
    the keys at or before it (causal among the new queries); window W: only the W keys before it
    and itself; slopes float32 [Hq]: ALiBi bias -slope * distance; theta: RoPE base, q rotated
    at its position in the kernel (rotate-half; the cache holds keys rotated at theirs, D even);
    scale: of q.k (D^-0.5).
    splits: how many pieces the keys are cut into (None: split_count's choice for this GPU).
    tile: the split kernel's BLOCK_N, num_warps, num_stages (None: _tile's; what
        attnbench.devtools.decode_tiles sweeps).
    dtypes: float16, bfloat16 (float32 accumulation) or float32 (IEEE dots), the same for q, k, v.
    The plain-torch twin: attnbench.models.decode.softmax_step.
    """
    b, n, hq, d = q.shape
    hkv = k_cache.shape[2]
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k and v must share one of float16, bfloat16, float32; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != d or hq % hkv:
        raise ValueError(f"k/v cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)} (Hq a multiple of Hkv, same D)")
    if d > 256 or (theta is not None and d % 2) or (window is not None and window < 0):
        raise ValueError(f"need head_dim <= 256 (even with RoPE) and a window >= 0; got D = {d}, window {window}")
    page = k_cache.shape[1]
    table = _identity_table(b, q.device) if page_table is None else page_table.to(torch.int32)
    rope_tables = None if theta is None else _rope_tables(_rope_positions(table.shape[1] * page, lengths, window), d, float(theta), 0, q.device)
    left = NO_LIMIT if window is None else int(window)
    scale = d**-0.5 if scale is None else scale
    slopes = None if slopes is None else slopes.to(device=q.device, dtype=torch.float32).contiguous()
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    return _launch(q, k_cache, v_cache, table, page, lengths, slopes, rope_tables, left, scale, splits, tile)
