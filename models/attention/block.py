"""block: block-diagonal softmax attention. The sequence is cut into non-overlapping blocks
of ``block`` tokens (the last one may be shorter); each query attends only to the keys of its
own block (causal: those at or before it). Unlike the sliding window, the visible set does
not move with the query: a query at the start of a block sees nothing of the previous one.
Cost O(T * block). Positions come from the model, or from the layer: RoPE rotates q and k
before the core; ALiBi (``slopes`` [Hq]) biases the scores within each block.

Decode: exact. A query at position p sees the keys p - p % block .. p, none after it, so a
causal forward's row p depends on tokens <= p alone, and a step is a softmax step whose window
is p % block (models/decode.softmax_step, a window per query). The cache rolls: a generate loop
keeps the last ``block`` tokens (BlockCache), a step of N new queries needs block - 1 + N rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.kernels import decode_cost, reference
from attnbench.models import peers, positions
from attnbench.models.decode import positions_of_new, softmax_step
from attnbench.models.pair_flops import visible_pairs
from attnbench.models.qkv import qkv_layer
from attnbench.models.registry import DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism
from attnbench.models.softmax_decode import KVCache

DEFAULT_BLOCK = 256


def _block_lens(seq_lens: torch.Tensor, starts: torch.Tensor, block: int) -> torch.Tensor:
    """Real keys in each block: [B, N] from seq_lens [B] and block starts [N]."""
    return (seq_lens.to(starts.device)[:, None] - starts[None, :]).clamp(0, block)


def torch_reference(q, k, v, *, causal=False, seq_lens=None, block=DEFAULT_BLOCK, slopes=None):
    """The definition, block by block: softmax attention (kernels/reference.py) on each block's
    q [B, L, Hq, D], k/v [B, L, Hkv, D]; o [B, T, Hq, D]."""
    outputs = []
    for start in range(0, q.shape[1], block):
        end = min(start + block, q.shape[1])
        lens = None if seq_lens is None else (seq_lens - start).clamp(0, end - start)
        outputs.append(
            reference.attention(q[:, start:end], k[:, start:end], v[:, start:end], causal=causal, seq_lens=lens, slopes=slopes)
        )
    return torch.cat(outputs, dim=1)


def sdpa_blocks(q, k, v, *, causal=False, seq_lens=None, block=DEFAULT_BLOCK, slopes=None):
    """Blocks folded into the batch: [B, T, H, D] -> [B * N, block, H, D], one SDPA call.

    The tail is zero-padded to a whole block; its padded keys are masked like key padding
    (needless when causal: they come after every real query).
    """
    b, t, hq, d = q.shape
    pad = -t % block
    n = (t + pad) // block
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(b * n, block, x.shape[2], d) for x in (q, k, v))
    lens = None
    if seq_lens is not None or (pad and not causal):
        real = torch.full((b,), t, device=q.device) if seq_lens is None else seq_lens
        lens = _block_lens(real, torch.arange(0, t + pad, block, device=q.device), block).flatten()  # (B * N,)
    o = peers.sdpa(q, k, v, causal=causal, seq_lens=lens, slopes=slopes)
    if seq_lens is not None:  # a block of padding only: its queries see nothing, so zeros (SDPA may give NaN)
        o = o * (lens > 0).view(-1, 1, 1, 1).to(o.dtype)
    return o.reshape(b, n * block, hq, d)[:, :t]


def block_options(cfg: LayerConfig) -> dict:
    block = int(cfg.options.get("block", DEFAULT_BLOCK))
    if block <= 0:
        raise ValueError(f"block size must be positive, not {block}")
    return {"block": block, **positions.alibi_option(cfg)}


def block_pairs(seq: int, block: int, causal: bool, seq_lens=None) -> int:
    """Visible (query, key) pairs summed over the blocks (and the batch, with seq_lens [B])."""
    total = 0
    for start in range(0, seq, block):
        size = min(block, seq - start)
        lens = None if seq_lens is None else (torch.as_tensor(seq_lens) - start).clamp(0, size)
        total += visible_pairs(size, size, causal=causal, window=None, seq_lens=lens)
    return total


def block_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """4 * Hq * D per visible pair (2 for Q K^T, 2 for P V), pairs counted within blocks only."""
    pairs = block_pairs(seq, block_options(cfg)["block"], cfg.causal, seq_lens)
    if seq_lens is None:
        pairs *= batch
    return 4.0 * cfg.heads * cfg.head_dim * pairs


def block_step(q, k_cache, v_cache, lengths, *, block=DEFAULT_BLOCK, page_table=None, slopes=None, theta=None):
    """One decode step by definition: q [B, N, Hq, D], the N newest tokens of each sequence (positions
    lengths[b] - N ..; rotated here at them when theta), k/v_cache as softmax_step's (contiguous
    [B, C, Hkv, D] or paged with page_table; keys as the core sees them, the new ones appended; a
    rolling cache of C >= block - 1 + N rows suffices), slopes float32 [Hq] -> o [B, N, Hq, D]. Query p
    sees its own block's keys at or before it: a window of p % block keys."""
    window = positions_of_new(lengths.to(q.device), q.shape[1]) % block  # (B, N)
    return softmax_step(q, k_cache, v_cache, lengths, page_table=page_table, window=window, slopes=slopes, theta=theta)


class BlockCache(KVCache):
    """A causal block layer's cache in a generate loop (DecodeForm.layer_cache): KVCache's rolling one
    of min(capacity, block) rows (a token's block holds at most ``block`` keys up to it), read by
    block_step; keys rotated at their positions under the layer's RoPE, q in the step."""

    def __init__(self, layer, capacity: int):
        options = layer.core_options()
        super().__init__(layer, capacity, block_step, {"block": options["block"], "slopes": options.get("slopes"), "theta": layer.theta})
        self.rows = min(capacity, options["block"])


def _step_options(cfg: LayerConfig, device) -> dict:
    """block_step's options of cfg: its block, ALiBi slopes on ``device``, the RoPE base when cfg's layer rotates."""
    options = block_options(cfg)
    if "slopes" in options:
        options["slopes"] = options["slopes"].to(device)
    return {**options, "theta": positions.theta(cfg) if cfg.positions == "rope" else None}


def _cache_rows(cfg: LayerConfig, context: int, queries: int) -> int:
    """Rows a sequence's rolling cache holds for steps of N new queries: block - 1 + N (at most L)."""
    return decode_cost.visible_keys(context, queries, block_options(cfg)["block"] - 1)


def _torch_step(cfg, batch, context, queries, device, dtype):
    """N new tokens against a random rolling cache of L tokens a sequence (the N among them)."""
    rows = _cache_rows(cfg, context, queries)
    q = torch.randn(batch, queries, cfg.heads, cfg.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, rows, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    options = _step_options(cfg, device)
    return lambda: block_step(q, k, v, lengths, **options)


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    """The keys the N new queries see together: from the first one's block start, (L - N) % block + N."""
    keys = decode_cost.visible_keys(context, queries, (context - queries) % block_options(cfg)["block"])
    return decode_cost.softmax_step_bytes(batch, keys, queries, cfg.heads, cfg.kv_heads, cfg.head_dim, itemsize)


def _memory(cfg: LayerConfig, context: int, queries: int, itemsize: int) -> int:
    return decode_cost.kv_cache_bytes(_cache_rows(cfg, context, queries), cfg.kv_heads, cfg.head_dim, itemsize)


DECODE = DecodeForm("kv-cache", _step_bytes, _memory, {
    "torch": DecodeImpl("torch", _torch_step, "plain torch step by definition: a softmax step whose window is p % block (block_step)",
                        graphable=False),
}, layer_cache=BlockCache)

IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition, block by block"),
    "sdpa": Impl("sdpa", sdpa_blocks, "blocks folded into the batch, one SDPA call (default dispatch)"),
}

MECHANISM = Mechanism(
    name="block",
    description="block-diagonal softmax attention: each query sees only its own block (causal within it)",
    family="sparse",
    layer=qkv_layer(block_options, IMPLS),
    impls=IMPLS,
    flops=block_flops,
    params={"block": (DEFAULT_BLOCK, "tokens per block; a query sees only keys of its own block")},
    decode=DECODE,
)
