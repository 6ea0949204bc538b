"""The bytes a decode step must move and the memory its cache or state holds, by the cost model:
the one home of these formulas (bench/flops.py, the registry's decode forms and
kernels/bench_decode.py all count with them). Plain integers in, bytes out; no torch.

What is counted is what the step cannot avoid reading or writing, each byte once:
- softmax against a KV cache: K and V of every cached key the new queries see (the N new tokens'
  own keys included: they are appended before the step, as flash_attn_with_kvcache does), the
  queries q read and the outputs o written. The page table, lengths, ALiBi slopes and RoPE
  tables are not counted (a few bytes a sequence).
- a recurrent state: the state read and written once (float32), the token's q, k, v (and the
  write strength beta, one value per kv head, for DeltaNet) read and o written; Performer also
  reads its random projection W [M, D] (float32) once a step, shared by the batch.
- nsa: a KV cache of every token plus the K and V means of its complete blocks; each branch reads
  its own keys (as fla's parallel_nsa and a sliding-window kernel do), so a row that the selected
  and the sliding branch both read is counted in each.
- bsbr: the current chunk's keys and values, the state retrieved for it and the finished chunks'
  summaries (chunk states and meta keys), in the inputs' dtype; a step that starts a chunk also
  reads every summary (the chunk-level retrieval) and writes the finished chunk's and the new
  retrieved state.
"""

from __future__ import annotations

STATE_ITEMSIZE = 4  # states are float32 whatever the inputs' dtype (models/state_decode.py)


def visible_keys(context: int, queries: int, window: int | None) -> int:
    """Cached keys that N new queries at positions L - N .. L - 1 see together: all L, or with a
    window W the W keys before the first of them through the last, W + N (at most L). Also the
    rows a sequence's cache needs: a rolling cache for a window holds exactly these."""
    return context if window is None else min(context, window + queries)


def kv_cache_bytes(rows: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K and V of ``rows`` cached tokens of one sequence: 2 (K, V) * rows * Hkv * D * itemsize."""
    return 2 * rows * kv_heads * head_dim * itemsize


def softmax_step_bytes(batch: int, keys: int, queries: int, heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """One softmax decode step of B sequences: K and V of the ``keys`` each reads, plus q read and
    o written (2 * N * Hq * D elements a sequence)."""
    return batch * (kv_cache_bytes(keys, kv_heads, head_dim, itemsize) + 2 * queries * heads * head_dim * itemsize)


def linear_state_bytes(kv_heads: int, dk: int, dv: int) -> int:
    """Linear attention's state of one sequence: kv [Hkv, Dk, Dv] and k_sum [Hkv, Dk], float32."""
    return kv_heads * (dk * dv + dk) * STATE_ITEMSIZE


def deltanet_state_bytes(kv_heads: int, dk: int, dv: int) -> int:
    """DeltaNet's state of one sequence: S [Hkv, Dk, Dv], float32."""
    return kv_heads * dk * dv * STATE_ITEMSIZE


def performer_state_bytes(kv_heads: int, features: int, dv: int) -> int:
    """Performer's state of one sequence: kv [Hkv, M, Dv], k_sum [Hkv, M] and the running key
    stabiliser [Hkv], float32."""
    return kv_heads * (features * dv + features + 1) * STATE_ITEMSIZE


def state_step_bytes(
    batch: int, state: int, heads: int, kv_heads: int, dk: int, dv: int, itemsize: int, gates: int = 0
) -> int:
    """One recurrent step of B sequences of ``state`` bytes each: the state read and written (2x),
    q [Hq, Dk], k [Hkv, Dk], v [Hkv, Dv] and ``gates`` values (DeltaNet's beta: Hkv) read, o [Hq, Dv] written."""
    inputs = heads * dk + kv_heads * (dk + dv) + gates + heads * dv
    return batch * (2 * state + inputs * itemsize)


def held_in_chunk(context: int, chunk: int) -> int:
    """Tokens the current chunk of a chunked state holds after ``context`` >= 1 tokens (1 .. chunk):
    the chunk holding the last token is kept, every one before it folded (gau, bsbr)."""
    return (context - 1) % chunk + 1


def nsa_cache_bytes(context: int, block: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """nsa's cache of one sequence: K and V of every token (the selected branch may pick any block)
    and the K and V means of its context // block complete blocks, in the cache's dtype."""
    return kv_cache_bytes(context + context // block, kv_heads, head_dim, itemsize)


def nsa_step_bytes(batch: int, context: int, queries: int, heads: int, kv_heads: int, head_dim: int, itemsize: int,
                   block: int, topn: int, window: int) -> int:
    """One nsa step of B sequences, per kv head: compressed, the K and V means of the complete
    blocks; selected, K and V of min(topn, blocks) blocks (the query's own one as far as it is
    filled; N > 1 queries may each select others: at most N times that, at most the context);
    sliding, the W + N keys visible_keys counts; q and its three branch gates per query head read,
    o written."""
    blocks = -(-context // block)  # the last one partly filled
    own = context - (blocks - 1) * block
    selected = min(context, queries * ((min(topn, blocks) - 1) * block + own))
    rows = context // block + selected + visible_keys(context, queries, window)
    return batch * (kv_cache_bytes(rows, kv_heads, head_dim, itemsize) + queries * heads * (2 * head_dim + 3) * itemsize)


def bsbr_state_bytes(context: int, chunk: int, heads: int, kv_heads: int, head_dim: int, state_size: int, itemsize: int) -> int:
    """bsbr's decode state of one sequence after ``context`` tokens, in the inputs' dtype: the current
    chunk's K and V [held, Hkv, D] and its queries' sum [Hq, D] (the next chunk's meta query), the state
    retrieved for it [Hq, D, D], and per finished chunk its state [Hkv, S] (S = D*D / compression) and
    meta key [Hkv, D]: the summary grows by one chunk's every ``chunk`` tokens (each chunk retrieves
    with its own meta query over all earlier chunks)."""
    held = held_in_chunk(context, chunk)
    finished = (context - held) // chunk
    return (kv_cache_bytes(held, kv_heads, head_dim, 1) + heads * head_dim * (1 + head_dim)
            + finished * kv_heads * (state_size + head_dim)) * itemsize


def bsbr_step_bytes(batch: int, context: int, chunk: int, heads: int, kv_heads: int, head_dim: int, state_size: int,
                    itemsize: int) -> int:
    """One bsbr step of B sequences, its token the context-th: the current chunk's K and V (the token's
    own included), the retrieved state and the query sum read, the sum written, q read, o written. A
    token that starts a chunk (context = 1 mod chunk, past the first) folds the finished one first: its
    K and V read, the older chunks' states and meta keys read and its own written, the new retrieved
    state written, and the learned maps read once for the batch (W_r, W_h [D, D]; with compression
    W_down [D*D, S] and W_up [S, D*D])."""
    held = held_in_chunk(context, chunk)
    per_sequence = kv_cache_bytes(held, kv_heads, head_dim, 1) + heads * head_dim * (head_dim + 4)
    maps = 0
    if held == 1 and context > 1:
        finished = (context - 1) // chunk  # the one just finished among them
        per_sequence += kv_cache_bytes(chunk, kv_heads, head_dim, 1) + finished * kv_heads * (state_size + head_dim) + heads * head_dim * head_dim
        compressed = state_size < head_dim * head_dim
        maps = 2 * head_dim * head_dim + (2 * head_dim * head_dim * state_size if compressed else 0)
    return (batch * per_sequence + maps) * itemsize
