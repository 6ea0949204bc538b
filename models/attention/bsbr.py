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

Decode (causal): BSBRState carries the current chunk's keys and values (at most C rows) and its
queries' sum, the state it retrieved, and per finished chunk its state and meta key. These
summaries grow by one chunk's every C tokens (Hkv * (S + D) values): each chunk's retrieval is a
softmax of its own meta query over every earlier chunk, so no fixed-size sum of them serves the
chunks to come. bsbr_step folds a finished chunk and retrieves for the next when that one starts
(O(N S) once per chunk), and is otherwise O(C D + D^2) per head whatever the context.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.kernels import decode_cost
from attnbench.models import positions
from attnbench.models.attention import block
from attnbench.models.decode import softmax_step
from attnbench.models.qkv import QKVAttention
from attnbench.models.registry import MATMUL_BACKWARD, DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism

DEFAULT_CHUNK = 128
DEFAULT_COMPRESSION = 1


def _real_tokens(b: int, t: int, seq_lens: torch.Tensor | None, device) -> torch.Tensor:
    """Which tokens are real: float [B, T, 1, 1] (1 = real key), broadcasting over [B, T, H, D]."""
    if seq_lens is None:
        return torch.ones(b, t, 1, 1, device=device)
    return (torch.arange(t, device=device)[None, :] < seq_lens.to(device)[:, None]).float()[:, :, None, None]


def _visible_chunks(counts, causal: bool) -> torch.Tensor:
    """Which chunks each chunk retrieves from, bool [B, 1, N, N], from real keys per chunk [B, N]."""
    n = counts.shape[1]
    chunk, other = torch.arange(n, device=counts.device)[:, None], torch.arange(n, device=counts.device)[None, :]
    visible = (other < chunk) if causal else (other != chunk)  # (N, N)
    return visible[None, None] & (counts > 0)[:, None, None, :]


def _retrieval_weights(r, h, visible) -> torch.Tensor:
    """a [B, H, M, N] from meta queries r [B, M, H, D], meta keys h [B, N, H, D] and the chunks each
    query's chunk retrieves from, visible bool [B|1, 1, M, N] (none: a = 0)."""
    scores = torch.einsum("bchd,behd->bhce", r, h) * r.shape[-1] ** -0.5
    upcast = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")).to(upcast), dim=-1)
    return weights.nan_to_num(0.0).to(r.dtype)


def _pooled(summed: torch.Tensor, count, meta: torch.Tensor) -> torch.Tensor:
    """A chunk's meta query or key: the sum of its queries or keys [..., D] over its real tokens
    ``count`` (at least 1) through the learned map meta [D, D]."""
    return summed / count @ meta.to(summed.dtype)


def _summaries(kc: torch.Tensor, vc: torch.Tensor, count, meta_key: torch.Tensor, compress: torch.Tensor | None):
    """Chunk states [B, N, H, S] (flatten(K_c^T V_c) / n_c, through W_down when compressing) and meta
    keys [B, N, H, D] of chunks kc/vc [B, N, C, H, D] (padded keys zero) with ``count`` real keys each
    ([B, N, 1, 1] or a number, at least 1)."""
    states = torch.einsum("bnchd,bnche->bnhde", kc, vc).flatten(-2) / count  # (B, N, H, D*D)
    if compress is not None:
        states = states @ compress.to(kc.dtype)
    return states, _pooled(kc.sum(2), count, meta_key)


def _retrieve(weights: torch.Tensor, states: torch.Tensor, decompress: torch.Tensor | None, d: int) -> torch.Tensor:
    """The states retrieved with weights a [B, H, M, N] from states [B, N, H, S] (through W_up when
    compressing): R [B, M, H, D, D]."""
    retrieved = torch.einsum("bhce,behf->bchf", weights, states)
    if decompress is not None:
        retrieved = retrieved @ decompress.to(states.dtype)
    return retrieved.unflatten(-1, (d, d))


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
    weights = _retrieval_weights(meta_queries, meta_keys, _visible_chunks(counts, causal))
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
    states, meta_keys = _summaries(kc, vc, per_chunk, meta_key, compress)
    meta_queries = _pooled((qc * real).sum(2), per_chunk, meta_query)
    if causal:
        meta_queries = F.pad(meta_queries, (0, 0, 0, 0, 1, 0))[:, :-1]
    weights = _retrieval_weights(meta_queries, meta_keys, _visible_chunks(counts.view(b, n), causal))
    retrieved = _retrieve(weights, states, decompress, d)  # (B, N, H, D, D)
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


class BSBRState(NamedTuple):
    """B sequences' causal bsbr after L tokens, keys and queries as the core sees them (after RoPE):
    the current chunk's keys and values [B, H, Hkv, D] (H = its tokens so far, 0 .. C) and its queries'
    sum [B, Hq, D] (the next chunk's meta query); each finished chunk's state [B, N, Hkv, S] (S = D*D
    / compression) and meta key [B, N, Hkv, D]; the state the current chunk retrieved from them
    [B, Hq, D, D] (zeros in chunk 0). The finished chunks' summaries stay apart, one more every C
    tokens: each chunk retrieves with its own meta query, a softmax over all of them."""

    keys: torch.Tensor
    values: torch.Tensor
    query_sum: torch.Tensor
    states: torch.Tensor
    meta_keys: torch.Tensor
    retrieved: torch.Tensor


def _retrieved_after(query_sum, states, meta_keys, chunk: int, meta_query, decompress, heads: int) -> torch.Tensor:
    """R [B, Hq, D, D] of the chunk after the N >= 0 finished chunks states/meta_keys [B, N, Hkv, .], the
    last of which summed its queries to query_sum [B, Hq, D] (its C tokens: the new chunk's meta query)."""
    b, n, hkv, d = meta_keys.shape
    if n == 0:
        return query_sum.new_zeros(b, heads, d, d)
    group = heads // hkv  # query head h reads kv head h // G's chunk summaries, as the forward's repeated k/v do
    meta_query_now = _pooled(query_sum, chunk, meta_query)[:, None]  # (B, 1, Hq, D)
    everything = torch.ones(1, 1, 1, n, dtype=torch.bool, device=query_sum.device)  # every finished chunk is earlier
    weights = _retrieval_weights(meta_query_now, meta_keys.repeat_interleave(group, 2), everything)  # (B, Hq, 1, N)
    return _retrieve(weights, states.repeat_interleave(group, 2), decompress, d)[:, 0]


def bsbr_state(q, k, v, chunk: int, *, meta_query, meta_key, compress=None, decompress=None) -> BSBRState:
    """The state after the T >= 1 tokens of q [B, T, Hq, D], k/v [B, T, Hkv, D]: every chunk before the
    one holding the last token folded, that one kept."""
    b, t, hq, d = q.shape
    done = t - decode_cost.held_in_chunk(t, chunk)  # tokens of the finished chunks
    kc, vc = (x[:, :done].unflatten(1, (done // chunk, chunk)) for x in (k, v))
    states, meta_keys = _summaries(kc, vc, chunk, meta_key, compress)
    last = q[:, max(done - chunk, 0) : done].sum(1)  # the last finished chunk's queries (none: R = 0 anyway)
    retrieved = _retrieved_after(last, states, meta_keys, chunk, meta_query, decompress, hq)
    return BSBRState(k[:, done:], v[:, done:], q[:, done:].sum(1), states, meta_keys, retrieved)


def bsbr_step(q, k, v, state: BSBRState, chunk: int, *, meta_query, meta_key, compress=None, decompress=None,
              slopes=None) -> tuple[torch.Tensor, BSBRState]:
    """Adds the token q [B, Hq, D], k/v [B, Hkv, D] and reads: (o [B, Hq, D], the new state). A token
    that starts a chunk folds the finished one first (its summary and the new chunk's retrieval); o is
    softmax attention over the chunk's keys so far (models/decode.softmax_step, ALiBi within the chunk)
    plus q / sqrt(D) times the retrieved state."""
    b, hq, d = q.shape
    if state.keys.shape[1] == chunk:
        summary = _summaries(state.keys[:, None], state.values[:, None], chunk, meta_key, compress)
        states, meta_keys = (torch.cat([old, new], 1) for old, new in zip((state.states, state.meta_keys), summary))
        retrieved = _retrieved_after(state.query_sum, states, meta_keys, chunk, meta_query, decompress, hq)
        state = BSBRState(state.keys[:, :0], state.values[:, :0], torch.zeros_like(state.query_sum), states, meta_keys, retrieved)
    keys, values = torch.cat([state.keys, k[:, None]], 1), torch.cat([state.values, v[:, None]], 1)
    held = torch.full((b,), keys.shape[1], dtype=torch.int32, device=q.device)
    local = softmax_step(q[:, None], keys, values, held, slopes=slopes)[:, 0]  # positions within the chunk: ALiBi's distances
    far = torch.einsum("bhd,bhde->bhe", q * d**-0.5, state.retrieved)
    return local + far, BSBRState(keys, values, state.query_sum + q, state.states, state.meta_keys, state.retrieved)


def _maps(layer: "BSBRAttention") -> dict:
    """The layer's learned maps as bsbr_state and bsbr_step take them (no autograd: a decode step)."""
    options = layer.core_options()
    return {name: None if options[name] is None else options[name].detach() for name in ("meta_query", "meta_key", "compress", "decompress")}


def _random_state(layer: "BSBRAttention", batch: int, tokens: int, device, dtype) -> BSBRState:
    """A random state of the sizes ``tokens`` >= 0 tokens leave (a step's work depends on them, not on
    what they hold)."""
    chunk = layer.core_options()["chunk"]
    held = decode_cost.held_in_chunk(tokens, chunk) if tokens else 0
    finished = (tokens - held) // chunk
    hq, hkv, d = layer.heads, layer.kv_heads, layer.head_dim
    size = d * d if layer.compress is None else layer.compress.shape[1]
    shapes = [(held, hkv, d), (held, hkv, d), (hq, d), (finished, hkv, size), (finished, hkv, d), (hq, d, d)]
    return BSBRState(*(torch.randn(batch, *shape, device=device, dtype=dtype) for shape in shapes))


class BSBRCache:
    """A causal bsbr layer's BSBRState in a generate loop (DecodeForm.layer_cache), whatever the
    capacity; RoPE, when the layer applies it, rotates q and k at their positions first."""

    def __init__(self, layer: "BSBRAttention", capacity: int):
        if not layer.causal:
            raise ValueError("a bidirectional bsbr has no incremental form (each chunk retrieves the chunks after it)")
        self.layer, self.length, self.state = layer, 0, None
        self.chunk, self.slopes = layer.core_options()["chunk"], layer.core_options().get("slopes")

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward over the prompt x [B, T, C] -> [B, T, C]; the state after it kept."""
        q, k, v = self.layer.project(x)
        q, k = self.layer.positioned(q, k)
        self.state, self.length = bsbr_state(q, k, v, self.chunk, **_maps(self.layer)), x.shape[1]
        return self.layer(x)

    def fill(self, batch: int, context: int, device, dtype) -> None:
        """As if ``context`` tokens had been read: a random state of the sizes they leave."""
        self.state, self.length = _random_state(self.layer, batch, context, device, dtype), context

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, C] of the token at position ``length`` -> [B, 1, C]."""
        q, k, v = self.layer.project(x)
        q, k = self.layer.positioned(q, k, self.length)
        o, self.state = bsbr_step(q[:, 0], k[:, 0], v[:, 0], self.state, self.chunk, **_maps(self.layer), slopes=self.slopes)
        self.length += 1
        return self.layer.out(o.reshape(x.shape[0], 1, -1))


def _torch_step(cfg, batch, context, queries, device, dtype):
    """The context-th token against a random state of the L - 1 tokens before it, with a fresh layer's
    maps (identity meta maps; random compression) and ALiBi slopes."""
    layer = BSBRAttention(cfg, IMPLS).to(device=device, dtype=dtype)
    chunk, slopes = layer.core_options()["chunk"], layer.core_options().get("slopes")
    state = _random_state(layer, batch, context - 1, device, dtype)
    q = torch.randn(batch, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(2))
    maps = _maps(layer)
    return lambda: bsbr_step(q, k, v, state, chunk, **maps, slopes=slopes)[0]


def _sizes(cfg: LayerConfig) -> tuple[int, int]:
    """(chunk C, state size S = D*D / compression) of cfg's bsbr."""
    compression = int(cfg.options.get("compression", DEFAULT_COMPRESSION))
    return bsbr_options(cfg)["chunk"], cfg.head_dim**2 // compression


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    chunk, size = _sizes(cfg)
    return decode_cost.bsbr_step_bytes(batch, context, chunk, cfg.heads, cfg.kv_heads, cfg.head_dim, size, itemsize)


def _memory(cfg: LayerConfig, context: int, queries: int, itemsize: int) -> int:
    chunk, size = _sizes(cfg)
    return decode_cost.bsbr_state_bytes(context, chunk, cfg.heads, cfg.kv_heads, cfg.head_dim, size, itemsize)


def _step_unsupported(cfg: LayerConfig, queries: int, device, dtype) -> str | None:
    if queries != 1:
        return "bsbr's step takes one token at a time (--queries 1)"
    return "the kernel-level step takes no RoPE (the layer rotates: --level layer or model)" if cfg.positions == "rope" else None


DECODE = DecodeForm("state", _step_bytes, _memory, {
    "torch": DecodeImpl("torch", _torch_step, "plain torch one-token step: the chunk's keys so far, the retrieved state (bsbr_step)",
                        graphable=False, unsupported=_step_unsupported),
}, layer_cache=BSBRCache, layer_host_sync="bsbr's step attends within its chunk through the plain-torch KV-cache step, which checks the lengths on the host")


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
    decode=DECODE,
)
