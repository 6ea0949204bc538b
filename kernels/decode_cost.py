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
