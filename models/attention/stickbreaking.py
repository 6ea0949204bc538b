"""stickbreaking: stick-breaking attention (Tan et al. 2024, "Scaling Stick-Breaking Attention").

Walking back from query i, each earlier key j breaks off a sigmoid share of the stick that
the nearer keys left:

    A_ij = sigmoid(z_ij) * prod_{j < l < i} (1 - sigmoid(z_il)),   z_ij = q_i . k_j / sqrt(D),   j < i

(``attend_current``: j <= i and the product over j < l <= i). No softmax: the weights of a
query sum to 1 - prod_l (1 - sigmoid(z_il)) <= 1, and the remainder goes nowhere (it weights
no value; fla's kernel returns it apart as ``rem`` and drops it too), so the first query
(without ``attend_current``) outputs zeros. Nearer keys win ties, so the mechanism encodes
recency itself: no position embeddings. Causal only; key padding: see models/causal_padding.py.

Computed in log space (stable for large |z|): log A_ij = logsigmoid(z_ij) + sum_{j<l<i}
logsigmoid(-z_il), in at least float32. The definition keeps [B, H, T, T]; the chunked form
walks query chunks of ``chunk`` rows against the keys up to the chunk's end, takes the sums
over l by a reversed cumulative sum, and is recomputed chunk by chunk in the backward pass:
memory O(chunk * T), not O(T * T). FLOPs stay quadratic, as for softmax attention.

Decode: exact only against a KV cache of every earlier key (the weight of key j depends on
every key between it and the query), so ``stickbreaking_step`` reads the whole contiguous cache
per step, as softmax does; no window, no paging here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnbench.models import positions
from attnbench.models.causal_padding import zero_padded_queries
from attnbench.models.decode import positions_of_new
from attnbench.models.softmax_decode import KVCache, full_cache_decode
from attnbench.models.fla import fla_missing
from attnbench.models.pair_flops import visible_pairs
from attnbench.models.qkv import qkv_layer
from attnbench.models.registry import Impl, LayerConfig, Mechanism

DEFAULT_CHUNK = 128


def _visible(pos_q: torch.Tensor, pos_k: torch.Tensor, attend_current: bool) -> torch.Tensor:
    """bool [C, S]: key j is before query i (or at it, with attend_current)."""
    return pos_k[None, :] <= pos_q[:, None] if attend_current else pos_k[None, :] < pos_q[:, None]


def torch_reference(q, k, v, *, causal=True, seq_lens=None, attend_current=False, chunk=DEFAULT_CHUNK):
    """The definition: q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]; the sums over
    j < l < i as one product with a strictly triangular 0/1 matrix ([B, H, T, T] in memory)."""
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    work = torch.promote_types(q.dtype, torch.float32)
    z = torch.einsum("bihd,bjhd->bhij", q, k).to(work) * d**-0.5  # (B, H, T, T)
    position = torch.arange(t, device=q.device)
    visible = _visible(position, position, attend_current)  # (T, T)
    log_unbroken = F.logsigmoid(-z).masked_fill(~visible, 0.0)  # log(1 - sigmoid(z_il)), 0 where l is not seen
    later = torch.ones(t, t, dtype=work, device=q.device).tril(-1)  # later[l, j] = 1 where l > j
    log_weights = F.logsigmoid(z) + log_unbroken @ later  # (B, H, T, T)
    weights = log_weights.exp().masked_fill(~visible, 0.0)
    o = torch.einsum("bhij,bjhd->bihd", weights.to(v.dtype), v)
    return zero_padded_queries(o, seq_lens)


def _chunk_attention(q, k, v, start: int, attend_current: bool):
    """One query chunk, grouped heads: q [B, C, Hkv, G, D] at positions start.., k/v [B, S, Hkv, D]
    (the keys up to the chunk's end) -> [B, C, Hkv, G, D]."""
    c, s = q.shape[1], k.shape[1]
    work = torch.promote_types(q.dtype, torch.float32)
    z = torch.einsum("bcngd,bsnd->bngcs", q, k).to(work) * q.shape[-1] ** -0.5  # (B, Hkv, G, C, S)
    pos_q = torch.arange(start, start + c, device=q.device)
    visible = _visible(pos_q, torch.arange(s, device=q.device), attend_current)  # (C, S)
    log_unbroken = F.logsigmoid(-z).masked_fill(~visible, 0.0)
    # sum over l > j: a reversed cumulative sum shifted by one key (no subtraction, no cancellation)
    from_here = log_unbroken.flip(-1).cumsum(-1).flip(-1)  # sum over l >= j
    after = F.pad(from_here[..., 1:], (0, 1))
    weights = (F.logsigmoid(z) + after).exp().masked_fill(~visible, 0.0)
    return torch.einsum("bngcs,bsnd->bcngd", weights.to(v.dtype), v)


def chunked(q, k, v, *, causal=True, seq_lens=None, attend_current=False, chunk=DEFAULT_CHUNK):
    """Query chunks of ``chunk`` rows against keys up to the chunk's end, heads grouped (no k/v
    copies for GQA), each chunk checkpointed under autograd; same arguments and result as the
    definition."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    grouped = q.reshape(b, t, hkv, hq // hkv, d)  # query head h uses kv head h // G: a view
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outputs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)  # keys after the chunk's last query carry no weight
        args = (grouped[:, start:end], k[:, :end], v[:, :end], start, attend_current)
        outputs.append(checkpoint(_chunk_attention, *args, use_reentrant=False) if recompute else _chunk_attention(*args))
    return zero_padded_queries(torch.cat(outputs, dim=1).reshape(b, t, hq, d), seq_lens)


def fla_parallel(q, k, v, *, causal=True, seq_lens=None, attend_current=False, chunk=DEFAULT_CHUNK):
    """flash-linear-attention's parallel_stickbreaking_attn (Triton, GQA native); its ``rem``
    (the unused stick) is dropped, as in the definition."""
    from fla.ops.stickbreaking_attn import parallel_stickbreaking_attn

    extra = {"attend_current": True} if attend_current else {}  # older fla releases lack the argument
    o, _ = parallel_stickbreaking_attn(q.contiguous(), k.contiguous(), v.contiguous(), scale=q.shape[-1] ** -0.5, **extra)
    return zero_padded_queries(o, seq_lens)


def _fla_unsupported(cfg: LayerConfig, device, dtype) -> str | None:
    return "fla's stick-breaking kernel supports head_dim <= 256" if cfg.head_dim > 256 else None


def stickbreaking_options(cfg: LayerConfig) -> dict:
    chunk = int(cfg.options.get("chunk", DEFAULT_CHUNK))
    if chunk <= 0:
        raise ValueError(f"stickbreaking chunk must be positive, not {chunk}")
    return {"attend_current": bool(cfg.options.get("attend_current", False)), "chunk": chunk}


def stickbreaking_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """4 * Hq * D per (query, earlier key) pair: 2 for q.k, 2 for A v (log-sigmoids, the
    cumulative sum and exp not counted). Pairs: causal, minus the diagonal unless attend_current."""
    pairs = visible_pairs(seq, seq, causal=True, window=None, seq_lens=seq_lens)
    queries = batch * seq if seq_lens is None else int(torch.as_tensor(seq_lens).clamp(max=seq).sum())
    if seq_lens is None:
        pairs *= batch
    if not stickbreaking_options(cfg)["attend_current"]:
        pairs -= queries  # each real query's own key
    return 4.0 * cfg.heads * cfg.head_dim * pairs


def stickbreaking_step(q, k_cache, v_cache, lengths, *, attend_current=False) -> torch.Tensor:
    """One decode step by definition: q [B, N, Hq, D], the N newest tokens of each sequence (at
    positions lengths[b] - N .. lengths[b] - 1, their keys already in the cache), k/v_cache
    [B, L, Hkv, D] (sequence b's tokens in rows 0 .. lengths[b] - 1) -> o [B, N, Hq, D]. The sums
    over the keys between j and the query are a reversed cumulative sum over the cache."""
    b, n, hq, d = q.shape
    group = hq // k_cache.shape[2]
    k, v = k_cache.repeat_interleave(group, dim=2), v_cache.repeat_interleave(group, dim=2)
    work = torch.promote_types(q.dtype, torch.float32)
    z = torch.einsum("bnhd,blhd->bhnl", q, k).to(work) * d**-0.5  # (B, Hq, N, L)
    pos_q = positions_of_new(lengths.to(q.device), n)  # (B, N)
    pos_k = torch.arange(k.shape[1], device=q.device)
    seen = (pos_k <= pos_q[..., None]) if attend_current else (pos_k < pos_q[..., None])  # (B, N, L)
    log_unbroken = F.logsigmoid(-z).masked_fill(~seen[:, None], 0.0)
    after = log_unbroken.flip(-1).cumsum(-1).flip(-1) - log_unbroken  # sum over l > j of the keys seen
    weights = (F.logsigmoid(z) + after).exp().masked_fill(~seen[:, None], 0.0)
    return torch.einsum("bhnl,blhd->bnhd", weights.to(v.dtype), v)


def _cache(layer, capacity: int) -> KVCache:
    """Every earlier key kept (each key's share depends on every key after it), read by stickbreaking_step."""
    return KVCache(layer, capacity, stickbreaking_step, {"attend_current": layer.core_options()["attend_current"]})


DECODE = full_cache_decode(
    stickbreaking_step, lambda cfg, device: {"attend_current": stickbreaking_options(cfg)["attend_current"]}, _cache,
    "plain torch decode step by definition (stickbreaking_step)",
)

IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition (T x T weights in memory)"),
    "chunked": Impl("chunked", chunked, "torch, log-space query chunks (O(chunk * T) memory, recomputed in backward)"),
    "fla": Impl(
        "fla", fla_parallel, "flash-linear-attention parallel_stickbreaking_attn (Triton)",
        needs_cuda=True, missing=fla_missing("stickbreaking_attn"), unsupported=_fla_unsupported,
    ),
}

MECHANISM = Mechanism(
    name="stickbreaking",
    description="stick-breaking attention: each earlier key takes a sigmoid share of what nearer keys left (Tan et al. 2024)",
    family="exact",
    layer=qkv_layer(stickbreaking_options, IMPLS),
    impls=IMPLS,
    flops=stickbreaking_flops,
    position="inside",
    refuses=positions.own_scheme_only("stickbreaking encodes positions itself (nearer keys break the stick first)"),
    bidirectional=False,
    params={
        "attend_current": (False, "a query also attends to its own key (the stick starts there)"),
        "chunk": (DEFAULT_CHUNK, "queries per chunk of the chunked form (memory O(chunk * T))"),
    },
    decode=DECODE,
)
