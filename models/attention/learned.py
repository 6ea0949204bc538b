"""learned: softmax attention over the key blocks a small learned scorer keeps, per head.

The sequence is cut into blocks of ``block`` tokens. For query block i and key block j <= i
(causal) the scorer gives a logit from block means of the layer's own q and k (a low-rank
bilinear form per head, plus a per-head bias), query block i summarised by the queries of the
block before it (every one of them precedes every row of block i, so the gates are causal; block 0
has one causal key block, its diagonal, which is always kept):

    score[b, h, i, j] = (mean_{i-1}(q_h) U_h) . (mean_j(k_h) V_h) / sqrt(rank)
    logit = bias_h + SCORE_BOUND tanh(score / SCORE_BOUND)          (|logit - bias_h| < SCORE_BOUND)
    p = sigmoid(logit),   gate = 1[p > 1/2]   (forward hard; gradient of the soft-gated output at g = p)

The diagonal block (and the first ``sinks`` key blocks) is always kept; blocks past the
diagonal are never visited. The core is softmax attention weighted by the gates,

    o_t = sum_s g(t, s) exp(s_ts) v_s / sum_s g(t, s) exp(s_ts)

which with hard gates is exactly masked softmax over the kept blocks (so the block-sparse
kernel computes it), and with all gates open is standard attention: the scorer's bias starts
at OPEN_BIAS > SCORE_BOUND, so every gate starts open whatever q and k are, and a student whose
q/k/v/out are copied from its teacher starts as the teacher exactly.
The gates' gradient reaches the scorer through p (LearnedMaskAttention.attend); the layer keeps the last
forward's gates: ``sparsity_penalty()`` is the mean gate probability over the learnable blocks
(what distill's --mask-l1 weighs) and ``density()`` the fraction of causal key blocks kept per
head. The scorer reads q and k detached: the penalty should bend the mask, not the copied q/k.

Causal only (bidirectional=False): the mask and its density are defined over the causal key
blocks of self-attention (T = S). Row t of a forward depends on no token after t, gates included
(until 2026-12-04 query block i was summarised by its own queries, which leaked the later queries of
a block into its earlier rows; results before then were measured with that form).
Kernel level (``attend`` of a layer computes the gates; a bare ``run`` without gates): every block
open. The registry's FLOPs are the dense causal count (the mask is data-dependent); a layer's
``visited_flops()`` counts the blocks it kept.

Decode: learned_step gives the last N rows of the causal forward over the tokens so far from the KV
cache of every token (the key block means) and two float32 [Hq, D] summaries a sequence: the
previous query block's mean (what the current block is scored by) and the current block's query sum
(what the next one will be scored by).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.kernels import decode_cost
from attnbench.kernels.block_mask import block_lists, block_sparse_flops, blocks, expand_blocks
from attnbench.kernels.reference import visible
from attnbench.models.decode import append
from attnbench.models.pair_flops import softmax_flops
from attnbench.models.qkv import QKVAttention
from attnbench.models.registry import DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism
from attnbench.models.softmax import _triton_missing

DEFAULT_BLOCK = 64
DEFAULT_RANK = 16
DEFAULT_SINKS = 0
SCORE_BOUND = 2.0  # the q/k term of a logit stays within +-2 of the head's bias
OPEN_BIAS = 3.0  # > SCORE_BOUND: every gate starts open (p >= sigmoid(1) = 0.73), away from the 1/2 threshold
_MAX_EXPONENT = 30.0  # closed keys above the open keys' max: finite gate gradients (their weight is 0)


def gated_reference(q, k, v, *, causal=True, seq_lens=None, gates=None, block=DEFAULT_BLOCK):
    """The definition, differentiable in the gates: q [B, T, Hq, D], k/v [B, S, Hkv, D], gates
    [B, Hq, cdiv(T, block), cdiv(S, block)] in [0, 1] (None: all open) -> o [B, T, Hq, D].
    Rows whose visible keys are all gated out get zeros."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    upcast = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bthd,bshd->bhts", q, k).to(upcast) * d**-0.5  # (B, H, T, S)
    seen = visible(t, s, causal=causal, seq_lens=seq_lens, device=q.device)
    g = torch.ones(1, 1, t, s, device=q.device) if gates is None else expand_blocks(gates.to(upcast), block, t, s)
    top = scores.masked_fill(~(seen & (g > 0)), float("-inf")).amax(-1, keepdim=True).detach()  # the open keys' max
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp((scores - top).clamp(max=_MAX_EXPONENT)).masked_fill(~seen, 0.0) * g
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    return torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v)


def triton_block_sparse(q, k, v, *, causal=True, seq_lens=None, gates=None, block=DEFAULT_BLOCK):
    """Our block-sparse flash kernel over the open blocks (hard gates; its backward gives q, k, v
    their gradients). Gates that need a gradient run gated_reference: the kernel has no gate gradient."""
    if gates is None:
        gates = torch.ones(1, 1, blocks(q.shape[1], block), blocks(k.shape[1], block), device=q.device)
    if torch.is_grad_enabled() and gates.requires_grad:
        return gated_reference(q, k, v, causal=causal, seq_lens=seq_lens, gates=gates, block=block)
    from attnbench.kernels.block_sparse import block_sparse_attention

    return block_sparse_attention(q, k, v, block_lists(gates > 0.5, block), causal=causal, seq_lens=seq_lens)


def _triton_unsupported(cfg: LayerConfig, device, dtype) -> str | None:
    from attnbench.kernels.flash_launch import SPARSE_TILE

    block = learned_options(cfg)["block"]
    return None if block % SPARSE_TILE == 0 else f"the block-sparse kernel needs a block that is a multiple of {SPARSE_TILE}, not {block}"


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of x [B, T, H, D] (a partial last block over its own tokens): [B, cdiv(T, block), H, D].
    The full blocks are a view of x (no copy, any strides along T)."""
    b, t, h, d = x.shape
    full = t // block
    means = x[:, : full * block].unflatten(1, (full, block)).mean(2)
    if t % block:
        means = torch.cat([means, x[:, full * block :].mean(1, keepdim=True)], 1)
    return means


def previous_block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """What each query block is scored by: the mean of the block before it in x [B, T, H, D], zeros for
    block 0 (its one causal key block, the diagonal, is always kept): [B, cdiv(T, block), H, D]."""
    means = block_means(x, block)
    return torch.cat([torch.zeros_like(means[:, :1]), means[:, :-1]], 1)


class BlockScorer(nn.Module):
    """Per-head logits [B, Hq, Nq, Nk] of key block j for query block i from block-mean-pooled
    q [B, T, Hq, D] (the previous block's) and k [B, S, Hkv, D] (the module docstring's formula)."""

    def __init__(self, heads: int, head_dim: int, rank: int):
        super().__init__()
        self.rank = rank
        self.u = nn.Parameter(torch.randn(heads, head_dim, rank) * head_dim**-0.5)
        self.v = nn.Parameter(torch.randn(heads, head_dim, rank) * head_dim**-0.5)
        self.bias = nn.Parameter(torch.full((heads,), OPEN_BIAS))

    def forward(self, q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
        return self.logits(previous_block_means(q, block), block_means(k, block))

    def logits(self, query_means: torch.Tensor, key_means: torch.Tensor) -> torch.Tensor:
        """[B, Hq, Nq, Nk] from each query block's summary query_means [B, Nq, Hq, D] and the key block
        means key_means [B, Nk, Hkv, D]."""
        dtype = query_means.dtype
        key_means = key_means.repeat_interleave(query_means.shape[2] // key_means.shape[2], dim=2)  # GQA: per q head
        queries = torch.einsum("bnhd,hdr->bhnr", query_means, self.u.to(dtype))
        keys = torch.einsum("bmhd,hdr->bhmr", key_means, self.v.to(dtype))
        score = torch.einsum("bhnr,bhmr->bhnm", queries, keys) * self.rank**-0.5
        return self.bias.to(dtype).view(1, -1, 1, 1) + SCORE_BOUND * torch.tanh(score / SCORE_BOUND)


def block_structure(n: int, sinks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal key blocks, forced ones: the diagonal and the first ``sinks``), bool [n, n] over n blocks."""
    rows, cols = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    causal = cols <= rows
    return causal, causal & ((cols == rows) | (cols < sinks))


def hard_gates(probs: torch.Tensor, learnable: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """The forward's gates, float [B, Hq, Nq, Nk]: 1[p > 1/2] on the learnable blocks, 1 on the forced ones, else 0."""
    return torch.where(learnable, (probs.detach() > 0.5).float(), forced.float())


class LearnedMaskAttention(QKVAttention):
    """QKVAttention (the teacher's q/k/v/out, under the same names) whose core is gated by a
    BlockScorer; sparsity_penalty() and density() read the last forward's gates."""

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl]):
        super().__init__(cfg, impls, learned_options)
        self.block = learned_options(cfg)["block"]
        self.sinks = int(cfg.options.get("sinks", DEFAULT_SINKS))
        rank = int(cfg.options.get("rank", DEFAULT_RANK))
        if self.sinks < 0 or rank <= 0:
            raise ValueError(f"learned needs sinks >= 0 and rank > 0, not sinks={self.sinks}, rank={rank}")
        self.scorer = BlockScorer(cfg.heads, cfg.head_dim, rank)
        self._last: dict | None = None

    def gates(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft, hard) gates [B, Hq, Nq, Nk]: soft = p on the learnable blocks (differentiable in
        the scorer), hard = 1[p > 1/2] there (no gradient); both 1 on the forced blocks."""
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"learned masks self-attention blocks (T = S), got T={q.shape[1]}, S={k.shape[1]}")
        causal, forced = block_structure(blocks(q.shape[1], self.block), self.sinks, q.device)
        learnable = causal & ~forced
        probs = torch.sigmoid(self.scorer(q.detach(), k.detach(), self.block).float())
        hard = hard_gates(probs, learnable, forced)
        self._last = {"probs": probs, "learnable": learnable, "causal": causal, "kept": hard > 0, "t": q.shape[1]}
        return torch.where(learnable, probs, forced.float()), hard

    def attend(self, q, k, v, seq_lens=None):
        """The core on the hard mask; while the scorer trains, plus soft - soft.detach() (zero in
        value): the gates' gradient is the soft-gated output's at g = p. q/k/v get the hard path's
        gradient only. (The plain straight-through estimator, the hard output's gradient at g = 0,
        scales with exp(score) of a closed key and reopens every gate the softmax would favour.)"""
        q, k = self.positioned(q, k)  # RoPE (when asked) before the scorer and the core alike
        soft, hard = self.gates(q, k)
        o = self.run(q, k, v, causal=True, seq_lens=seq_lens, gates=hard, **self.core_options())
        if torch.is_grad_enabled() and soft.requires_grad:
            relaxed = gated_reference(q.detach(), k.detach(), v.detach(), causal=True, seq_lens=seq_lens, gates=soft, block=self.block)
            o = o + (relaxed - relaxed.detach()).to(o.dtype)
        return o

    def _gates_seen(self) -> dict:
        if self._last is None:
            raise RuntimeError("the learned mask is known only after a forward")
        return self._last

    def mask_parameters(self) -> list[nn.Parameter]:
        """The scorer's parameters: distill trains them at their own rate (--mask-lr), since the
        gates must travel from OPEN_BIAS to the threshold within a fine-tuning run."""
        return list(self.scorer.parameters())

    def sparsity_penalty(self) -> torch.Tensor:
        """Mean gate probability over the learnable (causal, not forced) blocks of the last
        forward: the expected fraction of them kept, differentiable in the scorer (0 without any)."""
        last = self._gates_seen()
        probs = last["probs"].masked_select(last["learnable"])
        return probs.mean() if probs.numel() else last["probs"].sum() * 0.0

    def density(self) -> torch.Tensor:
        """Fraction of causal key blocks kept per head in the last forward (hard gates; the forced
        blocks count as kept): float [Hq]."""
        last = self._gates_seen()
        kept = last["kept"] & last["causal"]
        return kept.float().sum((0, 2, 3)) / (kept.shape[0] * last["causal"].sum())

    def visited_flops(self) -> float:
        """Forward FLOPs of the blocks the last forward kept (kernels/block_sparse.py's count)."""
        last = self._gates_seen()
        t = last["t"]
        return block_sparse_flops(last["kept"], t, t, self.heads, self.head_dim, self.block, causal=True)


def learned_options(cfg: LayerConfig) -> dict:
    block = int(cfg.options.get("block", DEFAULT_BLOCK))
    if block <= 0:
        raise ValueError(f"learned option block must be positive, not {block}")
    return {"block": block}


def learned_step(q, k_cache, v_cache, lengths, previous_mean, query_sum, *, scorer: BlockScorer, block=DEFAULT_BLOCK,
                 sinks=DEFAULT_SINKS):
    """One decode step: q [B, N, Hq, D], the N newest tokens' queries (positions lengths[b] - N ..; as
    the core sees them: the layer rotates for RoPE), k/v_cache [B, C, Hkv, D] (sequence b's tokens in
    rows 0 .. lengths[b] - 1, the new ones appended); previous_mean, query_sum float32 [B, Hq, D]: the
    query mean of the block before the one of position lengths[b] - N (zeros in block 0) and the query
    sum of that block's tokens before the new ones -> (o [B, N, Hq, D], both summaries for the block of
    position lengths[b]). Each sequence's rows are the last N rows of the causal forward over its
    tokens: gated_reference over the query blocks the new rows touch, the rows before them left out."""
    n = q.shape[1]
    outputs, previous_after, sums_after = [], [], []
    for i, length in enumerate(lengths.tolist()):
        first, before = divmod(length - n, block)  # the first touched query block, its tokens before the new ones
        padded = F.pad(q[i : i + 1], (0, 0, 0, 0, before, 0))  # (1, before + N, Hq, D): query blocks aligned
        touched = blocks(before + n, block)
        sums = F.pad(padded.float(), (0, 0, 0, 0, 0, touched * block - before - n)).unflatten(1, (touched, block)).sum(2)
        sums[:, 0] += query_sum[i]  # (1, touched, Hq, D); all but the last touched block are complete
        summaries = torch.cat([previous_mean[i][None, None], sums[:, :-1] / block], 1)  # what each touched block is scored by
        keys, values = k_cache[i : i + 1, :length], v_cache[i : i + 1, :length]
        probs = torch.sigmoid(scorer.logits(summaries.to(q.dtype), block_means(keys, block)).float())
        causal, forced = (x[first : first + touched] for x in block_structure(blocks(length, block), sinks, q.device))
        gates = hard_gates(probs, causal & ~forced, forced)  # (1, Hq, touched, blocks(length))
        outputs.append(gated_reference(padded, keys, values, causal=True, gates=gates, block=block)[:, before:])
        if length % block:  # the next token joins the last touched block
            previous_after.append(summaries[0, -1])
            sums_after.append(sums[0, -1])
        else:  # it starts a block, scored by the one just completed
            previous_after.append(sums[0, -1] / block)
            sums_after.append(torch.zeros_like(query_sum[i]))
    return torch.cat(outputs), torch.stack(previous_after), torch.stack(sums_after)


class LearnedCache:
    """A learned layer's cache in a generate loop (DecodeForm.layer_cache): k/v [B, C, Hkv, D] of every
    token (C = capacity; keys rotated at their positions under the layer's RoPE: a gate may keep any
    earlier block) and learned_step's two query summaries float32 [B, Hq, D], read with the layer's scorer."""

    def __init__(self, layer: LearnedMaskAttention, capacity: int):
        self.layer, self.capacity = layer, capacity
        self.options = {"scorer": layer.scorer, "block": layer.block, "sinks": layer.sinks}
        self.k = self.v = self.previous_mean = self.query_sum = None
        self.length = 0

    def _allocate(self, batch: int, device, dtype) -> None:
        self.k, self.v = (torch.zeros(batch, self.capacity, self.layer.kv_heads, self.layer.head_dim, device=device, dtype=dtype)
                          for _ in range(2))

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward over the prompt x [B, T, C] -> [B, T, C]; its keys and values kept, and the
        summaries of the block of position T: the mean of the block before it, the sum of its tokens so far."""
        q, k, v = self.layer.project(x)
        q, k = self.layer.positioned(q, k)
        t, full = x.shape[1], x.shape[1] // self.layer.block
        self._allocate(x.shape[0], x.device, k.dtype)
        self.k[:, :t], self.v[:, :t] = k, v
        means = block_means(q.float(), self.layer.block)
        self.previous_mean = means[:, full - 1] if full else torch.zeros_like(means[:, 0])
        self.query_sum = q[:, full * self.layer.block :].float().sum(1)
        self.length = t
        return self.layer(x)

    def fill(self, batch: int, context: int, device, dtype) -> None:
        """As if ``context`` tokens of B sequences were cached: random keys, values and summaries."""
        self._allocate(batch, device, dtype)
        self.k.normal_()
        self.v.normal_()
        self.previous_mean, self.query_sum = (torch.randn(batch, self.layer.heads, self.layer.head_dim, device=device) for _ in range(2))
        self.length = context

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, C] of the token at position ``length`` -> [B, 1, C], its key and value appended first."""
        q, k, v = self.layer.project(x)
        q, k = self.layer.positioned(q, k, self.length)
        held = torch.full((x.shape[0],), self.length, dtype=torch.int32, device=x.device)
        append(self.k, k, held)
        append(self.v, v, held)
        self.length += 1
        o, self.previous_mean, self.query_sum = learned_step(q, self.k, self.v, held + 1, self.previous_mean, self.query_sum, **self.options)
        return self.layer.out(o.reshape(x.shape[0], 1, -1))


def _torch_step(cfg, batch, context, queries, device, dtype):
    """N new tokens against a random cache of L tokens a sequence (the N among them) and random query
    summaries, with a fresh layer's scorer (every gate open: OPEN_BIAS)."""
    layer = LearnedMaskAttention(cfg, IMPLS).to(device=device, dtype=dtype)
    q = torch.randn(batch, queries, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, context, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(2))
    previous_mean, query_sum = (torch.randn(batch, cfg.heads, cfg.head_dim, device=device) for _ in range(2))
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    options = {"scorer": layer.scorer, "block": layer.block, "sinks": layer.sinks}
    return lambda: learned_step(q, k, v, lengths, previous_mean, query_sum, **options)[0]


def _summary_bytes(cfg: LayerConfig) -> int:
    """The two query summaries of one sequence (previous block's mean, current block's sum): 2 x [Hq, D], float32."""
    return 2 * cfg.heads * cfg.head_dim * decode_cost.STATE_ITEMSIZE


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    """A softmax step over every key (every gate open, as a fresh layer's are; the key block means are
    read from them) plus the query summaries read and written."""
    keys = decode_cost.softmax_step_bytes(batch, context, queries, cfg.heads, cfg.kv_heads, cfg.head_dim, itemsize)
    return keys + batch * 2 * _summary_bytes(cfg)


def _memory(cfg: LayerConfig, context: int, queries: int, itemsize: int) -> int:
    return decode_cost.kv_cache_bytes(context, cfg.kv_heads, cfg.head_dim, itemsize) + _summary_bytes(cfg)


PARAMS = {
    "block": (DEFAULT_BLOCK, "tokens per block; the scorer keeps or drops whole key blocks"),
    "rank": (DEFAULT_RANK, "rank of the per-head bilinear block scorer"),
    "sinks": (DEFAULT_SINKS, "leading key blocks always kept (attention sinks); the diagonal always is"),
}

IMPLS = {
    "torch": Impl("torch", gated_reference, "plain torch, T x T scores weighted by the block gates (differentiable in them)"),
    "triton": Impl(
        "triton", triton_block_sparse,
        "ours: block-sparse Triton flash kernel over the kept blocks (hard gates); while the gates train, the torch form",
        needs_cuda=True, missing=_triton_missing, unsupported=_triton_unsupported,
    ),
}

MECHANISM = Mechanism(
    name="learned",
    description="softmax over the key blocks a learned per-head scorer keeps (hard gates, relaxed gradient, L1 penalty)",
    family="sparse",
    layer=lambda cfg: LearnedMaskAttention(cfg, IMPLS),
    impls=IMPLS,
    flops=softmax_flops,
    position="learned",
    refuses={"alibi": "learned's gated scores take no ALiBi bias yet (its torch form and the block-sparse call pass no slopes)"},
    bidirectional=False,
    params=PARAMS,
    decode=DecodeForm("kv-cache", _step_bytes, _memory, {
        "torch": DecodeImpl(
            "torch", _torch_step,
            "plain torch step: gated softmax over the cache, the current block scored by the previous one's queries (learned_step)",
            graphable=False,
            unsupported=lambda cfg, queries, device, dtype: (
                "the kernel-level step takes no RoPE (the layer rotates: --level layer or model)" if cfg.positions == "rope" else None),
        ),
    }, layer_cache=LearnedCache),
)
