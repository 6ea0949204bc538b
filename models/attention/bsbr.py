"""bsbr: block sparse attention with block retrieval (BSBR; JacobFV/bsbr): exact softmax
attention within chunks plus a softmax retrieval over the states K^T V of other chunks.

Definition. Cut the sequence into chunks of C tokens (``chunk``, default 128; the last may be
shorter). Key padding removes keys everywhere; k/v heads are shared by G = Hq / Hkv query heads.

    local_i   = softmax attention of query i over its own chunk (causal: keys at or before i);
                exactly the `block` mechanism with block = C
    F_c       = flatten(K_c^T V_c) / n_c                 [D*D]  state of chunk c (n_c real keys)
                (compression r > 1: F_c W_down [D*D/r], learned)
    h_c       = mean(k over chunk c) W_h                 [D]    meta key of chunk c
    r_c       = mean(q over chunk c - 1) W_r if causal   [D]    meta query of chunk c: causal
                mean(q over chunk c)     W_r otherwise          builds it from the previous chunk,
                                                                so no token sees its own future
    a_c,c'    = softmax over visible c' of r_c . h_c' / sqrt(D); visible: c' < c (causal) or
                c' != c (bidirectional), and chunk c' has a real key; no visible chunk: a = 0
    R_c       = (sum_c' a_c,c' F_c') [W_up]  as a D x D matrix        retrieved state
    o_i       = local_i + (q_i / sqrt(D)) R_c(i)

W_r, W_h [D, D] (identity at init) and W_down [D*D, D*D/r], W_up [D*D/r, D*D] are learned,
shared by all heads.

What differs from the BSBR repository, and why: its meta queries and keys are projections
of each chunk's last hidden state, which a kernel taking q, k, v cannot see, so here they are
learned maps of the pooled queries and keys; its chunk-level masks let a chunk retrieve itself
and later chunks, a causal leak, so here a causal chunk retrieves only earlier chunks with a
meta query from the previous chunk; states are mean outer products and q is scaled by
1/sqrt(D) (the repository sums C outer products unscaled, which grows with C); W_up has no bias.

Cost per head: O(T C D) within chunks, O(T D^2) for states and their read-out, O((T/C)^2 D^2 / r)
for the retrieval: quadratic in T with a 1/C^2 factor. Positions come from the model, or from
the layer: RoPE rotates q and k before the core (so the states hold rotated keys); ALiBi
(``slopes`` [Hq]) biases the softmax scores within chunks (the retrieval has no token distances).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.models import positions
from attnbench.models.attention import block
from attnbench.models.qkv import QKVAttention
from attnbench.models.registry import MATMUL_BACKWARD, Impl, LayerConfig, Mechanism

DEFAULT_CHUNK = 128
DEFAULT_COMPRESSION = 1


def _real_tokens(b: int, t: int, seq_lens: torch.Tensor | None, device) -> torch.Tensor:
    """Which tokens are real: float [B, T, 1, 1] (1 = real key), broadcasting over [B, T, H, D]."""
    if seq_lens is None:
        return torch.ones(b, t, 1, 1, device=device)
    return (torch.arange(t, device=device)[None, :] < seq_lens.to(device)[:, None]).float()[:, :, None, None]


def _retrieval_weights(r, h, counts, causal: bool) -> torch.Tensor:
    """a [B, H, N, N] from meta queries r / keys h [B, N, H, D] and real keys per chunk [B, N]."""
    n = r.shape[1]
    scores = torch.einsum("bchd,behd->bhce", r, h) * r.shape[-1] ** -0.5
    chunk, other = torch.arange(n, device=r.device)[:, None], torch.arange(n, device=r.device)[None, :]
    visible = (other < chunk) if causal else (other != chunk)  # (N, N)
    visible = visible[None, None] & (counts > 0)[:, None, None, :]  # (B, 1, N, N)
    upcast = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")).to(upcast), dim=-1)
    return weights.nan_to_num(0.0).to(r.dtype)


def torch_reference(
    q, k, v, *, causal=False, seq_lens=None, chunk=DEFAULT_CHUNK, meta_query, meta_key, compress=None, decompress=None,
    slopes=None,
):
    """The definition, chunk by chunk; q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    b, t, hq, d = q.shape
    k, v = (x.repeat_interleave(hq // x.shape[2], dim=2) for x in (k, v))
    real = _real_tokens(b, t, seq_lens, q.device).to(q.dtype)
    states, meta_keys, pooled_queries, counts = [], [], [], []
    for start in range(0, t, chunk):
        rows = slice(start, start + chunk)
        keys, values, mask = k[:, rows] * real[:, rows], v[:, rows], real[:, rows]
        count = mask.sum(1)  # (B, 1, 1) real keys in the chunk
        state = torch.einsum("bchd,bche->bhde", keys, values) / count.clamp(min=1)[..., None]
        state = state.flatten(-2)  # (B, H, D*D)
        states.append(state if compress is None else state @ compress.to(q.dtype))
        meta_keys.append(keys.sum(1) / count.clamp(min=1) @ meta_key.to(q.dtype))  # (B, H, D)
        pooled_queries.append((q[:, rows] * mask).sum(1) / count.clamp(min=1) @ meta_query.to(q.dtype))
        counts.append(count.view(b))
    states, meta_keys, counts = torch.stack(states, 1), torch.stack(meta_keys, 1), torch.stack(counts, 1)
    meta_queries = torch.stack(pooled_queries, 1)  # (B, N, H, D)
    if causal:  # chunk c asks with the previous chunk's query; chunk 0 sees no chunk anyway
        meta_queries = torch.cat([torch.zeros_like(meta_queries[:, :1]), meta_queries[:, :-1]], 1)
    weights = _retrieval_weights(meta_queries, meta_keys, counts, causal)
    local = block.torch_reference(q, k, v, causal=causal, seq_lens=seq_lens, block=chunk, slopes=slopes)
    outputs = []
    for c, start in enumerate(range(0, t, chunk)):
        retrieved = torch.einsum("bhe,behf->bhf", weights[:, :, c], states)  # (B, H, D*D or D*D/r)
        if decompress is not None:
            retrieved = retrieved @ decompress.to(q.dtype)
        retrieved = retrieved.unflatten(-1, (d, d))  # (B, H, D, D)
        outputs.append(torch.einsum("bthd,bhde->bthe", q[:, start : start + chunk] * d**-0.5, retrieved))
    return local + torch.cat(outputs, 1)


def chunked(
    q, k, v, *, causal=False, seq_lens=None, chunk=DEFAULT_CHUNK, meta_query, meta_key, compress=None, decompress=None,
    slopes=None,
):
    """All chunks at once: local part by blocks in one SDPA call, retrieval as batched matmuls
    over [B, N, C, H, D] views. No T x T tensor: [B, H, N, N] retrieval weights, [B, N, H, D*D] states."""
    b, t, hq, d = q.shape
    k, v = (x.repeat_interleave(hq // x.shape[2], dim=2) for x in (k, v))
    local = block.sdpa_blocks(q, k, v, causal=causal, seq_lens=seq_lens, block=chunk, slopes=slopes)
    pad = -t % chunk
    n = (t + pad) // chunk
    real = _real_tokens(b, t, seq_lens, q.device).to(q.dtype)
    qc, kc, vc, real = (F.pad(x, (0, 0, 0, 0, 0, pad)).unflatten(1, (n, chunk)) for x in (q, k * real, v, real))
    counts = real.sum(2)  # (B, N, 1, 1)
    per_chunk = counts.clamp(min=1)
    states = torch.einsum("bnchd,bnche->bnhde", kc, vc).flatten(-2) / per_chunk  # (B, N, H, D*D)
    if compress is not None:
        states = states @ compress.to(q.dtype)
    meta_keys = kc.sum(2) / per_chunk @ meta_key.to(q.dtype)  # (B, N, H, D)
    meta_queries = (qc * real).sum(2) / per_chunk @ meta_query.to(q.dtype)
    if causal:
        meta_queries = F.pad(meta_queries, (0, 0, 0, 0, 1, 0))[:, :-1]
    weights = _retrieval_weights(meta_queries, meta_keys, counts.view(b, n), causal)
    retrieved = torch.einsum("bhce,behf->bchf", weights, states)
    if decompress is not None:
        retrieved = retrieved @ decompress.to(q.dtype)
    retrieved = retrieved.unflatten(-1, (d, d))  # (B, N, H, D, D)
    far = torch.einsum("bnchd,bnhde->bnche", qc * d**-0.5, retrieved).flatten(1, 2)[:, :t]
    return local + far


class BSBRAttention(QKVAttention):
    """QKVAttention plus BSBR's learned meta-query/key maps and optional state compression."""

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl]):
        super().__init__(cfg, impls, bsbr_options)
        d = cfg.head_dim
        self.meta_query = nn.Parameter(torch.eye(d))
        self.meta_key = nn.Parameter(torch.eye(d))
        compression = int(cfg.options.get("compression", DEFAULT_COMPRESSION))
        self.compress = self.decompress = None
        if compression > 1:
            compressed = d * d // compression
            self.compress = nn.Parameter(torch.randn(d * d, compressed) * (d * d) ** -0.5)
            self.decompress = nn.Parameter(torch.randn(compressed, d * d) * compressed**-0.5)

    def core_options(self) -> dict:
        return {
            **super().core_options(),
            "meta_query": self.meta_query,
            "meta_key": self.meta_key,
            "compress": self.compress,
            "decompress": self.decompress,
        }


def bsbr_options(cfg: LayerConfig) -> dict:
    chunk = int(cfg.options.get("chunk", DEFAULT_CHUNK))
    compression = int(cfg.options.get("compression", DEFAULT_COMPRESSION))
    if chunk <= 0 or compression <= 0 or (cfg.head_dim**2) % compression:
        raise ValueError(f"bsbr needs chunk > 0 and a compression dividing head_dim^2, not {chunk}, {compression}")
    return {"chunk": chunk, **positions.alibi_option(cfg)}


def bsbr_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """Within chunks: block attention's count (4 * Hq * D per visible pair). Retrieval, per head
    (padding not discounted): 2*D*D per token (k v^T into its chunk state) + 2*D*D per token
    (q times the retrieved D x D state); per chunk 2*D*D each for the meta query and key maps;
    per visible chunk pair 2*D (meta score) + 2*S (mixing states of size S = D*D/r); with
    compression, 2*D*D*S per chunk each for compressing its state and decompressing its retrieval."""
    chunk = bsbr_options(cfg)["chunk"]
    compression = int(cfg.options.get("compression", DEFAULT_COMPRESSION))
    d = cfg.head_dim
    size = d * d // compression
    chunks = -(-seq // chunk)
    pairs = chunks * (chunks - 1) // (2 if cfg.causal else 1)
    per_head = 4.0 * d * d * seq + 4.0 * d * d * chunks + (2.0 * d + 2.0 * size) * pairs
    if compression > 1:
        per_head += 4.0 * d * d * size * chunks
    local_cfg = dataclasses.replace(cfg, options={"block": chunk})
    return block.block_flops(local_cfg, batch, seq, seq_lens) + batch * cfg.heads * per_head


IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition, chunk by chunk"),
    "chunked": Impl("chunked", chunked, "torch, all chunks batched; local part in one SDPA call"),
}

MECHANISM = Mechanism(
    name="bsbr",
    description="block sparse attention with block retrieval: softmax within chunks + retrieval of chunk states",
    family="sparse",
    layer=lambda cfg: BSBRAttention(cfg, IMPLS),
    impls=IMPLS,
    flops=bsbr_flops,
    backward_factor=MATMUL_BACKWARD,  # retrieval is matmuls alone; the in-chunk SDPA recomputes its scores, +0.5x of that part not counted
    params={
        "chunk": (DEFAULT_CHUNK, "tokens per chunk (exact softmax within, state retrieval across)"),
        "compression": (DEFAULT_COMPRESSION, "state compression factor r: states D*D -> D*D/r (1 = none)"),
    },
)
