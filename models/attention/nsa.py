"""nsa: native sparse attention (Yuan et al. 2025, DeepSeek), as fla's parallel_nsa computes it.

Three softmax branches per query t, summed with per-head gates in (0, 1) from x:

    compressed: keys and values mean-pooled over blocks of ``block`` tokens; t attends to the
                blocks that end at or before it (softmax over compressed keys).
    selected:   the ``topn`` blocks with the highest compressed-branch probability, averaged
                over the query heads of a GQA group (one selection per kv head), always
                including the query's own and previous blocks and block 0 (in that order when
                topn < 3; equal probabilities: the earlier block); t attends to the tokens <= t
                of those blocks.
    sliding:    the ``window`` tokens before t and t itself (``--window W``'s one meaning,
                LayerConfig in models/registry.py).

    o_t = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa

Simplifications, as in fla: one block size for compression and selection (the paper
compresses blocks of 32 with stride 16 and selects blocks of 64) and mean pooling, not the
paper's learned MLP. Causal only; key padding: see models/causal_padding.py. Kernel level
(``attend`` without gates, see models/token_conditioned.py): every gate 1/2.

Positions come from the model, or from the layer: RoPE rotates q and k before the core (so
the compressed keys are means of rotated keys); ALiBi (``slopes`` [Hq]) biases the scores of
every branch, a compressed key sitting at the centre of its block (the bias also steers the
selection, which reads the compressed branch's probabilities).

Impls: the definition (each branch a masked softmax over all T keys, [B, H, T, T] masks);
``chunked``: query chunks that gather only their selected blocks ([chunk, topn * block]
scores) and their window band, recomputed in the backward pass; ``fla``: parallel_nsa for the
compressed and selected branches, our Triton flash kernel for the sliding one (fla's own
path needs flash-attn).

Decode: exact against a KV cache of every token (the selected branch may pick any block; keys
after RoPE) plus the K and V means of its complete blocks, one row more as each block completes
(NSACache). nsa_step gives each sequence's new rows by the chunked form's query chunk over its own
keys, so it ranks the blocks the causal forward over those tokens ranks; the gates come from x by
the layer's projection (kernel level: 1/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnbench.kernels import decode_cost
from attnbench.models import positions
from attnbench.models.causal_padding import zero_padded_queries
from attnbench.models.fla import fla_missing
from attnbench.models.registry import DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism
from attnbench.models.token_conditioned import TokenConditionedAttention

DEFAULT_BLOCK = 64
DEFAULT_TOPN = 16
DEFAULT_WINDOW = 511  # 511 keys before the query + its own: the 512 keys nsa's sliding branch saw when its window counted the query
DEFAULT_CHUNK = 64


def _default_gates(q: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
    return torch.full((*q.shape[:3], 3), 0.5, dtype=q.dtype, device=q.device) if gates is None else gates


def _gated(branches: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The branches [B, T, Hkv, G, D, 3] (cmp, slc, swa) weighted by gates [B, T, Hq, 3] and summed -> [B, T, Hq, D]."""
    b, t, hkv, group, d, _ = branches.shape
    branches = branches.reshape(b, t, hkv * group, d, 3)
    return (branches * gates[:, :, :, None].to(branches.dtype)).sum(-1)


def compress(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each complete block: x [B, T, H, D] -> [B, T // block, H, D] (a partial last
    block is never visible to the compressed branch)."""
    b, t, h, d = x.shape
    n = t // block
    return x[:, : n * block].reshape(b, n, block, h, d).mean(2)


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of the visible scores, in at least float32; rows with no visible entry -> 0."""
    upcast = torch.promote_types(scores.dtype, torch.float32)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")).to(upcast), dim=-1).nan_to_num(0.0)


def _select_blocks(probs: torch.Tensor, pos_q: torch.Tensor, n_blocks: int, block: int, topn: int):
    """Selected blocks of each query from the compressed-branch probabilities probs
    [B, Hkv, G, C, N_cmp] of queries at pos_q [C]: (indices [B, Hkv, C, n], allowed [B, Hkv, C, n])
    over the n = min(topn, n_blocks) highest scores. Forced blocks outrank every probability, the
    query's own block first, then the previous one, then block 0; equal scores go to the earlier
    block (a stable sort, not topk's unspecified order), so blocks not yet begun (score 0) never
    displace a visible one and a query's selection does not depend on T (the decode step's exactness)."""
    importance = probs.mean(2)  # (B, Hkv, C, N_cmp): one selection per kv head
    importance = F.pad(importance, (0, n_blocks - importance.shape[-1]))  # blocks not yet complete score 0
    blocks = torch.arange(n_blocks, device=probs.device)
    own = (pos_q // block)[:, None]  # (C, 1)
    rank = torch.where(blocks == own, 4.0, torch.where(blocks == own - 1, 3.0, torch.where(blocks == 0, 2.0, 0.0)))  # (C, N)
    forced = rank > 0
    visible = (blocks + 1) * block - 1 <= pos_q[:, None]
    importance = torch.where(forced, rank.to(importance.dtype), importance)
    index = importance.sort(dim=-1, descending=True, stable=True).indices[..., : min(topn, n_blocks)]  # (B, Hkv, C, n)
    allowed = (forced | visible).expand(*index.shape[:2], -1, -1).gather(-1, index)
    return index, allowed


def _with_alibi(scores: torch.Tensor, slopes: torch.Tensor | None, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
    """scores [B, Hkv, G, C, J] of queries at pos_q [C] and keys at pos_k [J] (or [B, Hkv, C, J])
    plus ALiBi's -slope * |pos_q - pos_k| for slopes [Hq] (query head h = kv head * G + g)."""
    if slopes is None:
        return scores
    hkv, group = scores.shape[1:3]
    distance = (pos_q[:, None] - pos_k).abs().to(scores.dtype)  # (C, J) or (B, Hkv, C, J)
    if distance.dim() == 4:
        distance = distance[:, :, None]
    return scores - slopes.to(scores.dtype).view(hkv, group, 1, 1) * distance


def _compressed_probs(q, k_cmp, pos_q, block, scale, slopes=None):
    """q [B, C, Hkv, G, D] at pos_q [C], k_cmp [B, N_cmp, Hkv, D] -> probs [B, Hkv, G, C, N_cmp]."""
    scores = torch.einsum("bcngd,bmnd->bngcm", q, k_cmp) * scale
    ends = (torch.arange(k_cmp.shape[1], device=q.device) + 1) * block - 1
    scores = _with_alibi(scores, slopes, pos_q, ends - (block - 1) / 2)  # a block's mean sits at its centre
    return _softmax_rows(scores, (ends[None, :] <= pos_q[:, None]))


def torch_reference(q, k, v, *, causal=True, seq_lens=None, gates=None, block=DEFAULT_BLOCK, topn=DEFAULT_TOPN,
                    window=DEFAULT_WINDOW, chunk=DEFAULT_CHUNK, slopes=None):
    """The definition: q [B, T, Hq, D], k/v [B, T, Hkv, D], gates [B, T, Hq, 3] (cmp, slc, swa)
    -> [B, T, Hq, D]; each branch a masked softmax over all keys."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    group, scale = hq // hkv, d**-0.5
    gates = _default_gates(q, gates)
    position = torch.arange(t, device=q.device)
    grouped = q.view(b, t, hkv, group, d)
    k_cmp, v_cmp = compress(k, block), compress(v, block)
    probs = _compressed_probs(grouped, k_cmp, position, block, scale, slopes)  # (B, Hkv, G, T, N_cmp)
    o_cmp = torch.einsum("bngtm,bmnd->btngd", probs.to(v.dtype), v_cmp)
    index, allowed = _select_blocks(probs, position, -(-t // block), block, topn)  # (B, Hkv, T, n)
    chosen = torch.zeros(b, hkv, t, -(-t // block), dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, index, allowed)  # (B, Hkv, T, N) selected blocks of each query
    causal_mask = position[None, :] <= position[:, None]  # (T, T)
    selected = chosen.repeat_interleave(block, dim=-1)[..., :t] & causal_mask  # (B, Hkv, T, T)
    sliding = causal_mask & (position[None, :] >= position[:, None] - window)
    scores = _with_alibi(torch.einsum("btngd,bsnd->bngts", grouped, k) * scale, slopes, position, position)  # (B, Hkv, G, T, T)
    o_slc = torch.einsum("bngts,bsnd->btngd", _softmax_rows(scores, selected[:, :, None]).to(v.dtype), v)
    o_swa = torch.einsum("bngts,bsnd->btngd", _softmax_rows(scores, sliding).to(v.dtype), v)
    return zero_padded_queries(_gated(torch.stack([o_cmp, o_slc, o_swa], dim=-1), gates), seq_lens)


def _gather_blocks(x: torch.Tensor, index: torch.Tensor, block: int) -> torch.Tensor:
    """The blocks ``index`` [B, Hkv, C, n] of x [B, T, Hkv, D] -> [B, Hkv, C, n, block, D]: whole
    rows of block * D contiguous values (a partial last block is zero-padded), not one index per
    element: ~5x less memory traffic than torch.gather, and its backward adds whole rows."""
    b, t, hkv, d = x.shape
    n_blocks = -(-t // block)
    blocks = F.pad(x, (0, 0, 0, 0, 0, n_blocks * block - t)).view(b, n_blocks, block, hkv, d)
    rows = blocks.permute(0, 3, 1, 2, 4).reshape(b * hkv * n_blocks, block * d)
    first = torch.arange(b * hkv, device=x.device).view(b, hkv, 1, 1) * n_blocks  # each (batch, head)'s block 0
    return rows.index_select(0, (first + index).flatten()).view(*index.shape, block, d)


def _chunk_attention(q, k, v, k_cmp, v_cmp, start: int, block: int, topn: int, window: int, slopes):
    """One query chunk: q [B, C, Hkv, G, D] at positions start.., k/v [B, T, Hkv, D], compressed
    k/v [B, N_cmp, Hkv, D], ALiBi slopes [Hq] or None -> the three branches [B, C, Hkv, G, D, 3]."""
    b, c, hkv, group, d = q.shape
    t, scale = k.shape[1], d**-0.5
    pos_q = torch.arange(start, start + c, device=q.device)
    probs = _compressed_probs(q, k_cmp, pos_q, block, scale, slopes)
    o_cmp = torch.einsum("bngcm,bmnd->bcngd", probs.to(v.dtype), v_cmp)
    # selected: gather topn blocks of keys per query, [C, topn * block] scores
    index, allowed = _select_blocks(probs, pos_q, -(-t // block), block, topn)  # (B, Hkv, C, n)
    pos_k = (index[..., None] * block + torch.arange(block, device=q.device)).flatten(-2)  # (B, Hkv, C, n * block)
    visible = allowed.repeat_interleave(block, dim=-1) & (pos_k <= pos_q[:, None])  # <= t also keeps pos_k < T
    k_sel, v_sel = (_gather_blocks(x, index, block).view(b, hkv, c, -1, d) for x in (k, v))
    scores = _with_alibi(torch.einsum("bcngd,bncjd->bngcj", q, k_sel) * scale, slopes, pos_q, pos_k)
    o_slc = torch.einsum("bngcj,bncjd->bcngd", _softmax_rows(scores, visible[:, :, None]).to(v.dtype), v_sel)
    # sliding: the band of keys [start - window, start + c)
    first = max(0, start - window)
    band = torch.arange(first, start + c, device=q.device)
    scores = _with_alibi(torch.einsum("bcngd,bsnd->bngcs", q, k[:, first : start + c]) * scale, slopes, pos_q, band)
    in_window = (band[None, :] <= pos_q[:, None]) & (band[None, :] >= pos_q[:, None] - window)
    o_swa = torch.einsum("bngcs,bsnd->bcngd", _softmax_rows(scores, in_window).to(v.dtype), v[:, first : start + c])
    return torch.stack([o_cmp, o_slc, o_swa], dim=-1)


def chunked(q, k, v, *, causal=True, seq_lens=None, gates=None, block=DEFAULT_BLOCK, topn=DEFAULT_TOPN,
            window=DEFAULT_WINDOW, chunk=DEFAULT_CHUNK, slopes=None):
    """Query chunks of ``chunk`` rows, each checkpointed under autograd: memory
    O(chunk * (T / block + topn * block + window)) per head; same arguments and result as the definition."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    gates = _default_gates(q, gates)
    grouped = q.view(b, t, hkv, hq // hkv, d)
    k_cmp, v_cmp = compress(k, block), compress(v, block)
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outputs = []
    for start in range(0, t, chunk):
        args = (grouped[:, start : start + chunk], k, v, k_cmp, v_cmp, start, block, topn, window, slopes)
        outputs.append(checkpoint(_chunk_attention, *args, use_reentrant=False) if recompute else _chunk_attention(*args))
    return zero_padded_queries(_gated(torch.cat(outputs, dim=1), gates), seq_lens)


def fla_parallel(q, k, v, *, causal=True, seq_lens=None, gates=None, block=DEFAULT_BLOCK, topn=DEFAULT_TOPN,
                 window=DEFAULT_WINDOW, chunk=DEFAULT_CHUNK, slopes=None):
    """fla's parallel_nsa (compressed + selected, Triton) plus the sliding branch by our Triton
    flash kernel, whose window (W, 0) means what nsa's W does (LayerConfig, models/registry.py)."""
    from fla.ops.nsa import parallel_nsa

    from attnbench.kernels.flash import flash_attention

    if slopes is not None:
        raise ValueError("fla's parallel_nsa takes no ALiBi bias")
    gates = _default_gates(q, gates)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g_cmp, g_slc, g_swa = (g.contiguous() for g in gates.to(q.dtype).unbind(-1))
    o = parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=topn, block_size=block, window_size=0, scale=q.shape[-1] ** -0.5)
    o_swa = flash_attention(q, k, v, causal=True, window=(window, 0))
    return zero_padded_queries(o + g_swa[..., None] * o_swa, seq_lens)


def _fla_unsupported(cfg: LayerConfig, device, dtype) -> str | None:
    if cfg.positions == "alibi":
        return "fla's parallel_nsa takes no ALiBi bias"
    group = cfg.heads // cfg.kv_heads
    if group < 16 or group & (group - 1):
        return f"fla's parallel_nsa needs Hq / Hkv a power of two >= 16, not {group}"
    if dtype not in (torch.float16, torch.bfloat16):
        return "fla's parallel_nsa needs fp16 or bf16"
    return None


class NSAAttention(TokenConditionedAttention):
    """TokenConditionedAttention with branch gates sigmoid(x W_g + b) [B, T, Hq, 3]."""

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl]):
        super().__init__(cfg, impls, nsa_options)
        self.gates = nn.Linear(cfg.dim, 3 * cfg.heads)

    def token_options(self, x: torch.Tensor) -> dict:
        return {"gates": torch.sigmoid(self.gates(x)).view(*x.shape[:2], -1, 3)}


def nsa_options(cfg: LayerConfig) -> dict:
    options = {name: int(cfg.options.get(name, default)) for name, (default, _) in PARAMS.items()}
    if cfg.window is not None:
        options["window"] = cfg.window
    for name, value in options.items():
        if value <= 0:
            raise ValueError(f"nsa option {name} must be positive, not {value}")
    return {**options, **positions.alibi_option(cfg)}


def nsa_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """4 * Hq * D per (query, key) pair of each branch (2 for q.k, 2 for P v), per query at t:
    compressed: (t + 1) // block blocks; selected: min(t + 1, topn * block) tokens (whole blocks
    as a kernel computes them); sliding: min(t + 1, window + 1). Pooling, selection, gates not counted."""
    options = nsa_options(cfg)
    seen = torch.arange(1, seq + 1, dtype=torch.int64)  # t + 1
    pairs = seen // options["block"] + seen.clamp(max=options["topn"] * options["block"]) + seen.clamp(max=options["window"] + 1)
    return 4.0 * cfg.heads * cfg.head_dim * batch * int(pairs.sum())


def nsa_step(q, k_cache, v_cache, lengths, k_cmp, v_cmp, *, gates=None, block=DEFAULT_BLOCK, topn=DEFAULT_TOPN,
             window=DEFAULT_WINDOW, slopes=None) -> torch.Tensor:
    """One decode step: q [B, N, Hq, D], the N newest tokens of each sequence (positions lengths[b] - N
    ..; as the core sees them: the layer rotates for RoPE), k/v_cache [B, L, Hkv, D] (keys as the core sees them,
    sequence b's in rows 0 .. lengths[b] - 1, the new ones appended), k/v_cmp [B, M, Hkv, D] the means
    of its complete blocks in rows 0 .. lengths[b] // block - 1 (the new ones' included), gates
    [B, N, Hq, 3] (None: 1/2) -> o [B, N, Hq, D]: each sequence's rows of the chunked form's query
    chunk (_chunk_attention) over its own tokens, as the causal forward over them computes them."""
    b, n, hq, d = q.shape
    hkv = k_cache.shape[2]
    grouped = q.reshape(b, n, hkv, hq // hkv, d)
    branches = [
        _chunk_attention(grouped[i : i + 1], k_cache[i : i + 1, :length], v_cache[i : i + 1, :length], k_cmp[i : i + 1, : length // block],
                         v_cmp[i : i + 1, : length // block], length - n, block, topn, window, slopes)
        for i, length in enumerate(lengths.tolist())
    ]
    return _gated(torch.cat(branches), _default_gates(q, gates))


class NSACache:
    """A causal nsa layer's cache in a generate loop (DecodeForm.layer_cache): k/v [B, C, Hkv, D] of
    every token (C = capacity; keys rotated at their positions under the layer's RoPE) and the means
    of the complete blocks k/v_cmp [B, C // block, Hkv, D], a row written as each block completes (past
    the rows a snapshot's length counts); the step's gates from x by the layer's own projection."""

    def __init__(self, layer: NSAAttention, capacity: int):
        options = layer.core_options()
        self.layer, self.capacity = layer, capacity
        self.options = {"block": options["block"], "topn": options["topn"], "window": options["window"], "slopes": options.get("slopes")}
        self.k = self.v = self.k_cmp = self.v_cmp = None
        self.length = 0

    def _allocate(self, batch: int, device, dtype) -> None:
        rows = (self.capacity, self.capacity // self.options["block"])
        self.k, self.k_cmp, self.v, self.v_cmp = (
            torch.zeros(batch, r, self.layer.kv_heads, self.layer.head_dim, device=device, dtype=dtype) for r in rows * 2)

    def _fold(self, start: int, end: int) -> None:
        """The means of the blocks that tokens start .. end - 1 complete, into k/v_cmp."""
        block = self.options["block"]
        first = start // block * block
        for cache, means in ((self.k, self.k_cmp), (self.v, self.v_cmp)):
            means[:, start // block : end // block] = compress(cache[:, first:end], block)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward over the prompt x [B, T, C] -> [B, T, C]; its keys, values and block means kept."""
        q, k, v = self.layer.project(x)
        _, k = self.layer.positioned(q, k)
        t = x.shape[1]
        self._allocate(x.shape[0], x.device, k.dtype)
        self.k[:, :t], self.v[:, :t] = k, v
        self._fold(0, t)
        self.length = t
        return self.layer(x)

    def fill(self, batch: int, context: int, device, dtype) -> None:
        """As if ``context`` tokens of B sequences were cached: random keys and values, their block means."""
        self._allocate(batch, device, dtype)
        self.k.normal_()
        self.v.normal_()
        self._fold(0, context)
        self.length = context

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, C] of the token at position ``length`` -> [B, 1, C], its key and value appended first."""
        q, k, v = self.layer.project(x)
        q, k = self.layer.positioned(q, k, self.length)
        t = self.length
        self.k[:, t], self.v[:, t] = k[:, 0], v[:, 0]
        self._fold(t, t + 1)
        self.length = t + 1
        lengths = torch.full((x.shape[0],), t + 1, dtype=torch.int32, device=x.device)
        o = nsa_step(q, self.k, self.v, lengths, self.k_cmp, self.v_cmp, gates=self.layer.token_options(x)["gates"], **self.options)
        return self.layer.out(o.reshape(x.shape[0], 1, -1))


def _step_options(cfg: LayerConfig, device) -> dict:
    """The step's options of cfg's core (chunk is the forward's alone), ALiBi slopes on ``device``."""
    options = nsa_options(cfg)
    options.pop("chunk")
    if "slopes" in options:
        options["slopes"] = options["slopes"].to(device)
    return options


def _torch_step(cfg, batch, context, queries, device, dtype):
    """N new tokens against a random cache of L tokens a sequence and its block means; gates 1/2 (the kernel level's)."""
    options = _step_options(cfg, device)
    q = torch.randn(batch, queries, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, context, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(2))
    k_cmp, v_cmp = compress(k, options["block"]), compress(v, options["block"])
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    return lambda: nsa_step(q, k, v, lengths, k_cmp, v_cmp, **options)


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    options = nsa_options(cfg)
    return decode_cost.nsa_step_bytes(batch, context, queries, cfg.heads, cfg.kv_heads, cfg.head_dim, itemsize,
                                      options["block"], options["topn"], options["window"])


def _memory(cfg: LayerConfig, context: int, queries: int, itemsize: int) -> int:
    return decode_cost.nsa_cache_bytes(context, nsa_options(cfg)["block"], cfg.kv_heads, cfg.head_dim, itemsize)


DECODE = DecodeForm("kv-cache", _step_bytes, _memory, {
    "torch": DecodeImpl(
        "torch", _torch_step, "plain torch step over the cache and its block means (nsa_step: the chunked form's query chunk)",
        graphable=False,
        unsupported=lambda cfg, queries, device, dtype: (
            "the kernel-level step takes no RoPE (the layer rotates: --level layer or model)" if cfg.positions == "rope" else None),
    ),
}, layer_cache=NSACache)


PARAMS = {
    "block": (DEFAULT_BLOCK, "tokens per block, for compression and selection alike"),
    "topn": (DEFAULT_TOPN, "blocks selected per query (block 0, its own and previous block included)"),
    "window": (DEFAULT_WINDOW, "keys before the query in the sliding branch, plus the query; --window sets it"),
    "chunk": (DEFAULT_CHUNK, "queries per chunk of the chunked form"),
}

IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition (T x T masks per branch)"),
    "chunked": Impl("chunked", chunked, "torch, query chunks gathering their selected blocks (recomputed in backward)"),
    "fla": Impl(
        "fla", fla_parallel, "flash-linear-attention parallel_nsa (Triton) + our Triton flash for the sliding branch",
        needs_cuda=True, missing=fla_missing("nsa"), unsupported=_fla_unsupported,
    ),
}

MECHANISM = Mechanism(
    name="nsa",
    windowed=True,
    description="native sparse attention: compressed, top-n selected and sliding branches, gated (Yuan et al. 2025)",
    family="sparse",
    layer=lambda cfg: NSAAttention(cfg, IMPLS),
    impls=IMPLS,
    flops=nsa_flops,
    bidirectional=False,
    params=PARAMS,
    decode=DECODE,
)
