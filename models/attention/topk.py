"""topk: top-k softmax attention. Each query scores every key it may see (causal and key
padding respected), keeps the ``topk`` highest scores and takes an exact softmax over those
alone (all of them when it sees fewer); the rest get zero weight.

The score computation is still quadratic (T x S dot products), so this saves no FLOPs over
dense attention in the Q K^T half; what it changes is which keys carry weight. The efficient
form runs query chunks of ``chunk`` rows, so it holds at most [B, H, chunk, S] scores at a
time, and under autograd recomputes each chunk in the backward pass instead of keeping all
scores: memory O(chunk * S), not O(T * S). Positions come from the model, or from the layer:
RoPE rotates q and k before the core; ALiBi (``slopes`` [Hq]) biases the scores before the
selection, so it decides which keys are kept as well as their weights.

Decode: exact against a KV cache of every earlier key (keys after RoPE), topk_step scoring all
of them for each new query; the cost is a softmax step's (every cached key read).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from attnbench.kernels import reference
from attnbench.models import positions
from attnbench.models.decode import positions_of_new, rope_at
from attnbench.models.qkv import qkv_layer
from attnbench.models.registry import Impl, LayerConfig, Mechanism
from attnbench.models.softmax_decode import KVCache, full_cache_decode

DEFAULT_TOPK = 64
DEFAULT_CHUNK = 128


def torch_reference(q, k, v, *, causal=False, seq_lens=None, topk=DEFAULT_TOPK, chunk=DEFAULT_CHUNK, slopes=None):
    """The definition: all scores [B, H, T, S], top-k per row, softmax over the kept scores,
    weighted sum of the gathered values; q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D]."""
    b, t, hq, d = q.shape
    s = k.shape[1]
    k = k.repeat_interleave(hq // k.shape[2], dim=2)
    v = v.repeat_interleave(hq // v.shape[2], dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * d**-0.5
    if slopes is not None:
        pos_k = torch.arange(s, device=q.device)
        scores = scores + positions.alibi_bias(slopes, pos_k[s - t :], pos_k, scores.dtype)
    mask = reference.visible(t, s, causal=causal, seq_lens=seq_lens, device=q.device)
    kept, index = scores.masked_fill(~mask, float("-inf")).topk(min(topk, s), dim=-1)  # (B, H, T, k)
    upcast = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(kept.to(upcast), dim=-1).nan_to_num(0.0).to(q.dtype)  # no visible key -> 0
    values = v.transpose(1, 2)[:, :, None].expand(b, hq, t, s, d)  # (B, H, T, S, D), a view
    gathered = values.gather(3, index[..., None].expand(-1, -1, -1, -1, d))  # (B, H, T, k, D)
    return torch.einsum("bhtk,bhtkd->bthd", probs, gathered)


def _chunk_attention(q, k, v, visible, topk: int, slopes, pos_q):
    """One query chunk, grouped heads: q [B, C, Hkv, G, D] at positions pos_q [C], k/v
    [B, S, Hkv, D], visible [B|1, 1, C, S], ALiBi slopes [Hq] or None -> [B, C, Hkv, G, D].
    Kept probabilities scattered into a dense [C, S] row block so that P V is one matmul."""
    c, hkv, group = q.shape[1:4]
    scores = torch.einsum("bcngd,bsnd->bngcs", q, k) * q.shape[-1] ** -0.5  # (B, Hkv, G, C, S)
    if slopes is not None:
        bias = positions.alibi_bias(slopes, pos_q, torch.arange(k.shape[1], device=q.device), scores.dtype)
        scores = scores + bias.view(hkv, group, c, -1)
    scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
    index = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
    upcast = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")).to(upcast), dim=-1).nan_to_num(0.0)
    return torch.einsum("bngcs,bsnd->bcngd", probs.to(v.dtype), v)


def chunked(q, k, v, *, causal=False, seq_lens=None, topk=DEFAULT_TOPK, chunk=DEFAULT_CHUNK, slopes=None):
    """Query chunks of ``chunk`` rows, heads grouped (no k/v copies for GQA), each chunk
    checkpointed under autograd; same arguments and result as the definition."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    grouped = q.reshape(b, t, hkv, hq // hkv, d)  # query head h uses kv head h // G: a view
    visible = reference.visible(t, s, causal=causal, seq_lens=seq_lens, device=q.device)  # (B|1, 1, T, S) bool
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outputs = []
    for start in range(0, t, chunk):
        rows = slice(start, start + chunk)
        pos_q = torch.arange(start, min(start + chunk, t), device=q.device) + (s - t)
        args = (grouped[:, rows], k, v, visible[:, :, rows], topk, slopes, pos_q)
        outputs.append(checkpoint(_chunk_attention, *args, use_reentrant=False) if recompute else _chunk_attention(*args))
    return torch.cat(outputs, dim=1).reshape(b, t, hq, d)


def topk_options(cfg: LayerConfig) -> dict:
    options = {"topk": int(cfg.options.get("topk", DEFAULT_TOPK)), "chunk": int(cfg.options.get("chunk", DEFAULT_CHUNK))}
    for name, value in options.items():
        if value <= 0:
            raise ValueError(f"topk option {name} must be positive, not {value}")
    return {**options, **positions.alibi_option(cfg)}


def topk_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """Per head: 2*D per visible pair for Q K^T (quadratic: every visible score is computed)
    + 2*D per kept pair for P V (min(topk, visible keys) per query). Selection not counted."""
    topk = topk_options(cfg)["topk"]
    lengths = [seq] * batch if seq_lens is None else torch.as_tensor(seq_lens).tolist()
    rows = torch.arange(1, seq + 1, dtype=torch.int64)  # keys at or before each query, causal
    visible, kept = 0, 0
    for length in lengths:
        per_query = rows.clamp(max=length) if cfg.causal else torch.full_like(rows, length)
        visible += int(per_query.sum())
        kept += int(per_query.clamp(max=topk).sum())
    return 2.0 * cfg.heads * cfg.head_dim * (visible + kept)


def topk_step(q, k_cache, v_cache, lengths, *, topk=DEFAULT_TOPK, slopes=None, theta=None) -> torch.Tensor:
    """One decode step by definition: q [B, N, Hq, D], the N newest tokens of each sequence (positions
    lengths[b] - N ..; rotated here at them when theta), k/v_cache [B, L, Hkv, D] (keys as the core
    sees them, sequence b's in rows 0 .. lengths[b] - 1; v's width Dv may differ) -> o [B, N, Hq, Dv]."""
    b, n, hq, d = q.shape
    pos_q = positions_of_new(lengths.to(q.device), n)  # (B, N)
    if theta is not None:
        q = rope_at(q, pos_q, theta)
    group = hq // k_cache.shape[2]
    k, v = k_cache.repeat_interleave(group, dim=2), v_cache.repeat_interleave(group, dim=2)
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) * d**-0.5  # (B, Hq, N, L)
    distance = pos_q[:, None, :, None] - torch.arange(k.shape[1], device=q.device)  # (B, 1, N, L)
    if slopes is not None:
        scores = scores - slopes.to(scores.dtype).view(1, hq, 1, 1) * distance.to(scores.dtype)
    kept, index = scores.masked_fill(distance < 0, float("-inf")).topk(min(topk, k.shape[1]), dim=-1)  # (B, Hq, N, k)
    upcast = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(kept.to(upcast), dim=-1).nan_to_num(0.0).to(q.dtype)
    gathered = v.transpose(1, 2)[:, :, None].expand(-1, -1, n, -1, -1).gather(3, index[..., None].expand(-1, -1, -1, -1, v.shape[-1]))
    return torch.einsum("bhnk,bhnkd->bnhd", probs, gathered)


def _cache(layer, capacity: int) -> KVCache:
    """Every earlier key (rotated under the layer's RoPE), read by topk_step."""
    options = layer.core_options()
    return KVCache(layer, capacity, topk_step, {"topk": options["topk"], "slopes": options.get("slopes"), "theta": layer.theta})


def _step_options(cfg: LayerConfig, device) -> dict:
    options = topk_options(cfg)
    slopes = options.get("slopes")
    return {"topk": options["topk"], "slopes": None if slopes is None else slopes.to(device)}


DECODE = full_cache_decode(
    topk_step, _step_options, _cache, "plain torch decode step by definition (topk_step: every cached key scored)",
    unsupported=lambda cfg, queries, device, dtype: (
        "the kernel-level step takes no RoPE (the layer rotates: --level layer or model)" if cfg.positions == "rope" else None),
)

IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition: all scores, top-k, gather"),
    "chunked": Impl("chunked", chunked, "torch, query chunks (O(chunk * T) memory, recomputed in backward)"),
}

MECHANISM = Mechanism(
    name="topk",
    description="top-k softmax attention: each query keeps its k best-scoring keys (scores still quadratic)",
    family="sparse",
    layer=qkv_layer(topk_options, IMPLS),
    impls=IMPLS,
    flops=topk_flops,  # backward: the default 2.5x (its chunked form recomputes every score, as flash kernels do)
    params={
        "topk": (DEFAULT_TOPK, "keys kept per query (all visible keys when fewer)"),
        "chunk": (DEFAULT_CHUNK, "queries per chunk of the efficient form (memory O(chunk * T))"),
    },
    decode=DECODE,
)
