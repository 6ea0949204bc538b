"""Softmax attention's decode step against a KV cache, in plain torch: the ground truth of the
Triton split-KV kernel (kernels/decode.py) and what a generate loop calls on any device.

Caches (both hold keys as the attention sees them, e.g. after RoPE):
- contiguous: k/v [B, L, Hkv, D], sequence b's tokens at rows 0 .. lengths[b]-1;
- paged: a pool of pages k/v [P, page, Hkv, D] and a page table int [B, max_pages]; token j of
  sequence b is row j % page of page page_table[b, j // page] (vLLM's layout). Table entries
  past a sequence's last page are never read (any value).
lengths int [B]: the tokens each sequence has in the cache, the N new ones included (they are
appended before the step, as FlashAttention's flash_attn_with_kvcache and vLLM do).
A cache has C rows per sequence (contiguous: L; paged: max_pages * page) and token j lives in
row j % C, so a sliding window W runs on a rolling cache of C >= W + N rows: tokens past C
overwrite the oldest, which the window no longer sees. Without a window, lengths[b] <= C.

Step: q [B, N, Hq, D], the N new queries of each sequence, Hq a multiple of Hkv (GQA/MQA: query
head h reads kv head h // (Hq / Hkv)). Query n of sequence b sits at position
p = lengths[b] - N + n and sees the cached keys j <= p (causal among the new queries too), with
a window W only those with j >= p - W (W may differ per query: block attention's p % block, the
keys of the query's own block); ALiBi adds -slope_h * (p - j) to the scores; RoPE
(theta) rotates q at p, the cache holding keys rotated at their own positions (rope_at, before
they are appended).
"""

from __future__ import annotations

import torch

from attnbench.kernels.reference import rope_angles, rotate


def positions_of_new(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """Positions lengths[b] - N .. lengths[b] - 1 of each sequence's N newest tokens: long [B, N]."""
    return lengths.long()[:, None] - n + torch.arange(n, device=lengths.device)


def rope_at(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, N, H, D] rotated by RoPE (rotate-half, kernels/reference.py) at positions long [B, N]."""
    b, n, h, d = x.shape
    cos, sin = rope_angles(positions.reshape(-1), d, theta)  # (B*N, D/2)
    return rotate(x.reshape(1, b * n, h, d), cos, sin).reshape(b, n, h, d)


def step_options(core_options: dict) -> dict:
    """A causal softmax-family layer's kernel options (models/softmax.py: window (left, right),
    slopes, theta, offset) as softmax_step's and kernels/decode.py's: window W = left, the W keys
    before the query plus the query (LayerConfig.window's meaning, models/registry.py). A window
    reaching right of the query or a RoPE offset has no decode form here (ValueError)."""
    options = dict(core_options)
    window = options.pop("window", None)
    if window is not None:
        if window[1] != 0:
            raise ValueError(f"a decode step is causal: window {tuple(window)} reaches right of the query")
        options["window"] = window[0]
    if options.pop("offset", 0):
        raise ValueError("a decode step takes RoPE positions from the cache; offset must be 0")
    return options


def gather_pages(pages: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """The paged cache pages [P, page, Hkv, D] read as a contiguous one [B, max_pages * page, Hkv, D]."""
    b, n = page_table.shape
    rows = pages[page_table.long().clamp(0, pages.shape[0] - 1)]  # (B, max_pages, page, Hkv, D); unread entries clamped
    return rows.reshape(b, n * pages.shape[1], *pages.shape[2:])


def paginate(
    cache: torch.Tensor, lengths: torch.Tensor, page: int, generator: torch.Generator | None = None, spare: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous cache [B, L, Hkv, D] copied into a paged one: (pages [P, page, Hkv, D], page_table
    int32 [B, max_pages]). Every sequence gets ceil(lengths[b] / page) pages, at random places in
    the pool (a shuffled table, as a long-running server's is) among ``spare`` extra pages; rows
    of pages no token fills are zero, table entries past a sequence's pages are -1."""
    b, _, hkv, d = cache.shape
    need = [-(-int(n) // page) for n in lengths.tolist()]
    total = sum(need) + spare
    order = torch.randperm(total, generator=generator).tolist()
    pages = cache.new_zeros(total, page, hkv, d)
    table = torch.full((b, max(max(need), 1)), -1, dtype=torch.int32)
    for i, count in enumerate(need):
        for p in range(count):
            slot = order.pop()
            table[i, p] = slot
            rows = cache[i, p * page : min((p + 1) * page, int(lengths[i]))]
            pages[slot, : rows.shape[0]] = rows
    return pages, table.to(cache.device)


def append(cache: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor, page_table: torch.Tensor | None = None) -> None:
    """Writes new [B, N, Hkv, D] into the cache at positions lengths[b] .. lengths[b] + N - 1 (rows
    position % C: module docstring), in place (contiguous [B, L, Hkv, D], or paged [P, page, Hkv, D]
    with its page_table [B, max_pages]); the caller then adds N to lengths."""
    n = new.shape[1]
    positions = lengths.long().to(new.device)[:, None] + torch.arange(n, device=new.device)  # (B, N)
    if page_table is None:
        cache[torch.arange(cache.shape[0], device=new.device)[:, None], positions % cache.shape[1]] = new
    else:
        page = cache.shape[1]
        rows = positions % (page_table.shape[1] * page)
        slots = page_table.long().gather(1, rows // page)  # (B, N)
        cache[slots, rows % page] = new


def softmax_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    page_table: torch.Tensor | None = None,
    window: int | torch.Tensor | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step by definition (module docstring): o [B, N, Hq, D] in q's dtype.

    q [B, N, Hq, D]; k/v_cache contiguous [B, L, Hkv, D] or, with page_table int [B, max_pages],
    pages [P, page, Hkv, D]; lengths int [B] >= N (> C: a rolling cache, window + N - n <= C for
    every query n); window: W keys before each query, an int or long [B, N] per query (None: all);
    slopes float32 [Hq] (ALiBi); theta: RoPE base (q is rotated here, the cache holds rotated
    keys); scale: of q.k, D^-0.5 by default. Computes as
    kernels/reference.attention does (scores in q's dtype, softmax in at least float32).
    """
    if page_table is not None:
        k_cache, v_cache = gather_pages(k_cache, page_table), gather_pages(v_cache, page_table)
    b, n, hq, d = q.shape
    capacity = k_cache.shape[1]
    if bool((lengths < n).any()):
        raise ValueError(f"every sequence needs its {n} new tokens in the cache; lengths {lengths.tolist()}")
    per_query = None if window is None else torch.as_tensor(window, device=q.device).expand(b, n)  # (B, N)
    if bool((lengths > capacity).any()) and (
        per_query is None or int((per_query + n - torch.arange(n, device=q.device)).max()) > capacity  # query n's W_n + N - n rows
    ):
        raise ValueError(f"lengths {lengths.tolist()} overflow a cache of {capacity} rows (a rolling cache needs window + N <= {capacity})")
    scale = d**-0.5 if scale is None else scale
    pos_q = positions_of_new(lengths.to(q.device), n)  # (B, N)
    if theta is not None:
        q = rope_at(q, pos_q, theta)
    group = hq // k_cache.shape[2]
    positions = torch.arange(max(capacity, int(lengths.max())), device=q.device)  # (L,) every position, held in row % C
    k, v = (x[:, positions % capacity].repeat_interleave(group, dim=2) for x in (k_cache, v_cache))  # (B, L, Hq, D)
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) * scale  # (B, Hq, N, L)
    distance = pos_q[:, None, :, None] - positions  # (B, 1, N, L); overwritten rows are outside the window
    if slopes is not None:
        scores = scores - slopes.to(scores.dtype).view(1, hq, 1, 1) * distance.to(scores.dtype)
    seen = distance >= 0
    if per_query is not None:
        seen &= distance <= per_query[:, None, :, None]
    scores = scores.masked_fill(~seen, float("-inf"))
    upcast = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores.to(upcast), dim=-1).to(q.dtype)
    return torch.einsum("bhnl,blhd->bnhd", probs, v)
