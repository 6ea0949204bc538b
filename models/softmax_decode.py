"""The softmax family's decode step (a registry DecodeForm): the torch definition
(models/decode.py's softmax_step), our Triton split-KV kernel on a contiguous and on a paged
cache (kernels/decode.py), and the peers SDPA (enable_gqa), FlexAttention (compiled, its block
mask built from the cache's positions) and, where it is installed (an optional extra), FlashInfer's
paged decode; a KV cache's cost model.

A case's inputs: B sequences holding L tokens each (the N new ones included), a cache of C rows a
sequence, k/v [B, C, Hkv, D] (C = L, or with a window W the rolling cache of W + N rows, position
j in row j % C: kernels/decode_cost.visible_keys), q [B, N, Hq, D] (the layout of kernels/decode.py).
The paged cache: pages of PAGE rows [P, PAGE, Hkv, D] through a shuffled page table [B, C / PAGE]
(rounded up), as a long-running server's is. The mechanism's kernel options (window, ALiBi
slopes, RoPE theta) become the step's (models/decode.step_options); the cache holds keys already
rotated, so RoPE rotates q alone, inside the step. A generate loop keeps one `KVCache` per layer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from attnbench.kernels import decode_cost
from attnbench.models.decode import append, positions_of_new, rope_at, softmax_step, step_options
from attnbench.models.registry import DecodeForm, DecodeImpl, LayerConfig, missing_module
from attnbench.models.softmax import _triton_missing

PAGE = 64  # tokens per page of the paged cache (kernels/bench_decode.py's default too)


def _kernel_unsupported(cfg: LayerConfig, queries: int, device, dtype) -> str | None:
    return "our decode kernel takes head_dim <= 256" if cfg.head_dim > 256 else None


flashinfer_missing = missing_module("flashinfer", " (pip install 'attnbench[flashinfer]' where its CUDA build fits)")


def _flashinfer_unsupported(cfg: LayerConfig, queries: int, device, dtype, options: dict) -> str | None:
    if queries > 1:
        return "FlashInfer's decode wrapper takes one new query a sequence (--queries 1)"
    if options.get("slopes") is not None:
        return "FlashInfer's ALiBi uses its own slopes; ours are the mechanism's (no way to pass them)"
    return "FlashInfer's decode takes fp16 or bf16" if dtype == torch.float32 else None


def flashinfer_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor,
                      lengths: torch.Tensor, *, window: int | None = None, theta: float | None = None,
                      scale: float | None = None, first: int = 0) -> Callable[[], torch.Tensor]:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper planned for one step (softmax_step's meaning):
    q [B, 1, Hq, D], pages k/v [P, page, Hkv, D] (NHD), page_table int32 [B, max_pages], lengths int
    [B] (tokens held, in position order from position ``first``: no rolling cache) -> the step,
    () -> o [B, 1, Hq, D]. The plan (host work) happens here; the step is capturable as a CUDA graph
    (fixed index buffers)."""
    import flashinfer

    b, _, hq, d = q.shape
    page, hkv = k_pages.shape[1], k_pages.shape[2]
    held = lengths.long()
    pages = (held + page - 1) // page  # (B,) pages each sequence fills
    indptr = F.pad(pages.cumsum(0), (1, 0)).to(torch.int32)
    indices = torch.cat([page_table[i, : int(n)] for i, n in enumerate(pages.tolist())]).to(torch.int32)
    last_page_len = (held - (pages - 1) * page).to(torch.int32)
    workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
        paged_kv_last_page_len_buffer=last_page_len)
    wrapper.plan(indptr, indices, last_page_len, hq, hkv, d, page, window_left=-1 if window is None else window,
                 q_data_type=q.dtype, kv_data_type=k_pages.dtype, sm_scale=scale)
    at = positions_of_new(lengths, 1) + first

    def step() -> torch.Tensor:
        rotated = q if theta is None else rope_at(q, at, theta)
        return wrapper.run(rotated[:, 0], (k_pages, v_pages))[:, None]

    return step


def held_positions(lengths: torch.Tensor, rows: int) -> torch.Tensor:
    """The position each row of a cache of ``rows`` rows holds after lengths[b] tokens: long [B, C]
    (row r: the latest position p < lengths[b] with p % C == r; rows no token reached yet hold r,
    beyond every query)."""
    r = torch.arange(rows, device=lengths.device)
    return r + rows * ((lengths.long()[:, None] - 1 - r) // rows).clamp(min=0)


def sdpa_mask(lengths: torch.Tensor, queries: int, rows: int, window: int | None, slopes: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA's attn_mask for the step (softmax_step's meaning): bool [B, 1, N, C] of the cached keys
    each new query sees, or with ALiBi slopes [Hq] the float bias [B, Hq, N, C] (-inf where unseen);
    None when every query sees every row (one query, no window, no bias)."""
    if queries == 1 and window is None and slopes is None:
        return None
    distance = positions_of_new(lengths, queries)[:, :, None] - held_positions(lengths, rows)[:, None, :]  # (B, N, C)
    seen = distance >= 0
    if window is not None:
        seen &= distance <= window
    if slopes is None:
        return seen[:, None]
    bias = -slopes.view(1, -1, 1, 1) * distance[:, None].to(slopes.dtype)
    return bias.masked_fill(~seen[:, None], float("-inf")).to(dtype)


def flex_decode(lengths: torch.Tensor, queries: int, rows: int, *, window: int | None = None,
                slopes: torch.Tensor | None = None, theta: float | None = None, compiled: bool = True) -> Callable[..., torch.Tensor]:
    """FlexAttention's decode step for caches of ``rows`` rows after lengths int [B] tokens (softmax_step's
    meaning): the block mask and ALiBi score_mod are built here, once (setup); the returned
    step(q [B, N, Hq, D], k/v [B, C, Hkv, D]) -> o [B, N, Hq, D] rotates q (RoPE) and calls flex."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnbench.models.peers import compiled_flex

    pos_q = positions_of_new(lengths, queries)  # (B, N)
    held = held_positions(lengths, rows)  # (B, C)

    def distance(b, q_idx, kv_idx):
        return pos_q[b, q_idx] - held[b, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        seen = distance(b, q_idx, kv_idx) >= 0
        return seen if window is None else seen & (distance(b, q_idx, kv_idx) <= window)

    block_mask = create_block_mask(mask_mod, lengths.shape[0], None, queries, rows, device=lengths.device)
    score_mod = None
    if slopes is not None:
        slopes = slopes.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * distance(b, q_idx, kv_idx)

    flex = compiled_flex() if compiled else flex_attention

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rotated = q if theta is None else rope_at(q, pos_q, theta)
        o = flex(rotated.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=block_mask,
                 enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)

    return step


class KVCache:
    """A softmax-family layer's KV cache in a generate loop (DecodeForm.layer_cache): k/v
    [B, C, Hkv, D] in the projection's dtype, keys as the core sees them (rotated at their own
    positions under RoPE), ALiBi slopes and window from the layer's core options (step_options);
    C = capacity rows, or with a window W the rolling cache of min(capacity, W + 1) rows
    (models/decode.py). ``layer``: the QKVAttention of a causal softmax-family mechanism; ``attend``:
    the step that reads the cache (the definition, or our Triton kernel)."""

    def __init__(self, layer, capacity: int, attend: Callable[..., torch.Tensor] = softmax_step, options: dict | None = None):
        """``options``: attend's keywords; None: the layer's core options as a softmax step takes them
        (step_options). Mechanisms that read every earlier key with their own step (stickbreaking, topk,
        exposb, hopfield) give theirs: no window, so ``capacity`` rows; a RoPE theta among them rotates
        the keys on the way in."""
        self.layer, self.attend = layer, attend  # attend: softmax_step's signature (kernels/decode.decode_attention's too)
        # ValueError from step_options: a window right of the query, a RoPE offset
        self.options = step_options(layer.core_options()) if options is None else options
        window = self.options.get("window")
        self.rows = capacity if window is None else min(capacity, window + 1)
        self.k = self.v = self.lengths = None

    def _keep(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Appends k/v [B, N, Hkv, D] of the tokens after the ``lengths`` the cache holds, rotating the keys."""
        theta = self.options.get("theta")
        if theta is not None:
            k = rope_at(k, positions_of_new(self.lengths + k.shape[1], k.shape[1]), theta)
        append(self.k, k, self.lengths)
        append(self.v, v, self.lengths)
        self.lengths = self.lengths + k.shape[1]

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward over the prompt x [B, T, C] -> [B, T, C]; its last C keys and values kept."""
        _, k, v = self.layer.project(x)
        b, t = x.shape[:2]
        self.k, self.v = (k.new_zeros(b, self.rows, *k.shape[2:]) for _ in range(2))
        kept = min(t, self.rows)  # a rolling cache takes the tokens its window still sees, one per row
        self.lengths = torch.full((b,), t - kept, dtype=torch.int32, device=x.device)
        self._keep(k[:, t - kept :], v[:, t - kept :])
        return self.layer(x)

    def fill(self, batch: int, context: int, device, dtype) -> None:
        """As if ``context`` tokens of B sequences were cached: random keys and values in the rows they
        would take (a step's work depends on how many, not on what they hold)."""
        shape = (batch, self.rows, self.layer.kv_heads, self.layer.head_dim)
        self.k, self.v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
        self.lengths = torch.full((batch,), context, dtype=torch.int32, device=device)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, C] of the token at position lengths -> [B, 1, C], its key and value appended first."""
        q, k, v = self.layer.project(x)
        self._keep(k, v)
        o = self.attend(q, self.k, self.v, self.lengths, **self.options)  # (B, 1, Hq, D)
        return self.layer.out(o.reshape(x.shape[0], 1, -1))


def full_cache_decode(step: Callable[..., torch.Tensor], step_options: Callable[[LayerConfig, torch.device], dict],
                      layer_cache: Callable, description: str, unsupported: Callable | None = None) -> DecodeForm:
    """The DecodeForm of a mechanism that reads every earlier key with its own plain-torch
    step(q, k_cache, v_cache, lengths, **step_options(cfg, device)): a softmax step's bytes, a full
    cache's memory; its one impl, torch, steps against a random cache of L tokens a sequence."""

    def build(cfg, batch, context, queries, device, dtype):
        q = torch.randn(batch, queries, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, context, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(2))
        lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
        options = step_options(cfg, device)
        return lambda: step(q, k, v, lengths, **options)

    def step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
        return decode_cost.softmax_step_bytes(batch, context, queries, cfg.heads, cfg.kv_heads, cfg.head_dim, itemsize)

    def memory(cfg: LayerConfig, context: int, queries: int, itemsize: int) -> int:
        return decode_cost.kv_cache_bytes(context, cfg.kv_heads, cfg.head_dim, itemsize)

    extra = {} if unsupported is None else {"unsupported": unsupported}
    return DecodeForm("kv-cache", step_bytes, memory, {"torch": DecodeImpl("torch", build, description, graphable=False, **extra)},
                      layer_cache=layer_cache)


def softmax_decode(options: Callable[[LayerConfig], dict]) -> DecodeForm:
    """The DecodeForm of a softmax-family mechanism whose kernel options are ``options(cfg)``
    (models/softmax.py's softmax_options, or the mechanism's own)."""

    def window_of(cfg: LayerConfig) -> int | None:
        return step_options(options(cfg)).get("window")

    def inputs(cfg: LayerConfig, batch: int, context: int, queries: int, device, dtype):
        """(q, k, v, lengths, step options, rows C) of a contiguous cache."""
        opts = step_options(options(cfg))
        if opts.get("slopes") is not None:
            opts["slopes"] = opts["slopes"].to(device)
        rows = decode_cost.visible_keys(context, queries, opts.get("window"))
        q = torch.randn(batch, queries, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, rows, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(2))
        lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
        return q, k, v, lengths, opts, rows

    def torch_step(cfg, batch, context, queries, device, dtype):
        q, k, v, lengths, opts, _ = inputs(cfg, batch, context, queries, device, dtype)
        return lambda: softmax_step(q, k, v, lengths, **opts)

    def triton_step(cfg, batch, context, queries, device, dtype):
        from attnbench.kernels.decode import decode_attention

        q, k, v, lengths, opts, _ = inputs(cfg, batch, context, queries, device, dtype)
        return lambda: decode_attention(q, k, v, lengths, **opts)

    def paged_inputs(cfg, batch, context, queries, device, dtype):
        """(q, k/v pages [P, PAGE, Hkv, D], a shuffled page table [B, C / PAGE], lengths, step options, rows C)."""
        q, _, _, lengths, opts, rows = inputs(cfg, batch, context, queries, device, dtype)
        pages = batch * math.ceil(rows / PAGE)
        k, v = (torch.randn(pages, PAGE, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(2))
        table = torch.randperm(pages, device=device).to(torch.int32).view(batch, -1)
        return q, k, v, table, lengths, opts, rows

    def paged_step(cfg, batch, context, queries, device, dtype):
        from attnbench.kernels.decode import decode_attention

        q, k, v, table, lengths, opts, _ = paged_inputs(cfg, batch, context, queries, device, dtype)
        return lambda: decode_attention(q, k, v, lengths, page_table=table, **opts)

    def flashinfer_step(cfg, batch, context, queries, device, dtype):
        """The C rows a query sees, in position order (a window's last W + 1 tokens): the same keys read as ours."""
        q, k, v, table, _, opts, rows = paged_inputs(cfg, batch, context, queries, device, dtype)
        held = torch.full((batch,), rows, dtype=torch.int32, device=device)
        return flashinfer_decode(q, k, v, table, held, window=opts.get("window"), theta=opts.get("theta"), first=context - rows)

    def sdpa_step(cfg, batch, context, queries, device, dtype, backend: str | None = None):
        """SDPA's step, its own dispatch or pinned to ``backend`` (an SDPBackend name)."""
        q, k, v, lengths, opts, rows = inputs(cfg, batch, context, queries, device, dtype)
        mask = sdpa_mask(lengths, queries, rows, opts.get("window"), opts.get("slopes"), dtype)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, C, D): SDPA's layout, made once
        theta, at = opts.get("theta"), positions_of_new(lengths, queries)
        pinned = [] if backend is None else [getattr(torch.nn.attention.SDPBackend, backend)]

        def step():
            rotated = q if theta is None else rope_at(q, at, theta)
            with torch.nn.attention.sdpa_kernel(pinned) if pinned else contextlib.nullcontext():
                o = F.scaled_dot_product_attention(rotated.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)
            return o.transpose(1, 2)  # (B, N, Hq, D)

        return step

    def flash_backend_unsupported(cfg: LayerConfig, queries: int, device, dtype) -> str | None:
        opts = step_options(options(cfg))
        if queries > 1 or opts.get("window") is not None or opts.get("slopes") is not None:
            return "SDPA's flash backend takes no mask or bias (N > 1 new queries, a window or ALiBi need one)"
        return None if dtype != torch.float32 else "SDPA's flash backend needs fp16 or bf16"

    def flex_step(cfg, batch, context, queries, device, dtype):
        q, k, v, lengths, opts, rows = inputs(cfg, batch, context, queries, device, dtype)
        step = flex_decode(lengths, queries, rows, **opts)
        k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hkv, C, D] in memory, flex's layout
        return lambda: step(q, k, v)

    def step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
        keys = decode_cost.visible_keys(context, queries, window_of(cfg))
        return decode_cost.softmax_step_bytes(batch, keys, queries, cfg.heads, cfg.kv_heads, cfg.head_dim, itemsize)

    def memory(cfg: LayerConfig, context: int, queries: int, itemsize: int) -> int:
        rows = decode_cost.visible_keys(context, queries, window_of(cfg))
        return decode_cost.kv_cache_bytes(rows, cfg.kv_heads, cfg.head_dim, itemsize)

    ours = {"needs_cuda": True, "missing": _triton_missing, "unsupported": _kernel_unsupported}
    impls = {
        "triton": DecodeImpl("triton", triton_step, "ours: Triton split-KV decode, contiguous cache", **ours),
        "triton-paged": DecodeImpl("triton-paged", paged_step, f"ours: Triton split-KV decode, paged cache ({PAGE}-token pages, shuffled table)", **ours),
        "sdpa": DecodeImpl("sdpa", sdpa_step, "F.scaled_dot_product_attention with enable_gqa, default dispatch"),
        "sdpa-cudnn": DecodeImpl("sdpa-cudnn", functools.partial(sdpa_step, backend="CUDNN_ATTENTION"),
                                 "F.scaled_dot_product_attention pinned to cuDNN", needs_cuda=True),
        "sdpa-flash": DecodeImpl("sdpa-flash", functools.partial(sdpa_step, backend="FLASH_ATTENTION"),
                                 "F.scaled_dot_product_attention pinned to its flash backend", needs_cuda=True,
                                 unsupported=flash_backend_unsupported),
        "flashinfer": DecodeImpl("flashinfer", flashinfer_step, f"FlashInfer's BatchDecodeWithPagedKVCacheWrapper ({PAGE}-token pages, shuffled table)",
                                 needs_cuda=True, missing=flashinfer_missing,
                                 unsupported=lambda cfg, queries, device, dtype: _flashinfer_unsupported(
                                     cfg, queries, device, dtype, step_options(options(cfg)))),
        "flex": DecodeImpl("flex", flex_step, "FlexAttention (torch.compile), block mask of the cache's positions, ALiBi as score_mod",
                           needs_cuda=True),
        "torch": DecodeImpl("torch", torch_step, "plain torch decode step by definition (models/decode.py)", graphable=False),
    }
    return DecodeForm("kv-cache", step_bytes, memory, impls, layer_cache=KVCache)
