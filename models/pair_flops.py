"""Forward FLOPs counted over the visible query-key pairs, FlashAttention-3 convention.

Each mechanism's registry entry names one of these (or its own, in its file) as
``flops(cfg, batch, seq, seq_lens=None) -> float``: forward FLOPs of the core for q, k, v of
``seq`` tokens. Backward and fwd+bwd multipliers, and every count the harness records, live in bench/flops.py.
"""

from __future__ import annotations

import torch

from attnbench.models.registry import LayerConfig


def visible_pairs(t: int, s: int, *, causal: bool, window: tuple[int, int] | None, seq_lens=None) -> int:
    """Exact number of (query, key) pairs a softmax kernel must compute, summed over the batch
    when ``seq_lens`` [B] is given (else for one sequence). Closed form per query row, O(T)."""
    pos_q = torch.arange(t, dtype=torch.int64) + (s - t)  # (T,)
    hi = torch.full_like(pos_q, s - 1)
    lo = torch.zeros_like(pos_q)
    if causal:
        hi = torch.minimum(hi, pos_q)
    if window is not None:
        lo = torch.maximum(lo, pos_q - window[0])
        hi = torch.minimum(hi, pos_q + window[1])
    if seq_lens is None:
        return int((hi - lo + 1).clamp(min=0).sum())
    total = 0
    for length in torch.as_tensor(seq_lens).tolist():
        total += int((torch.minimum(hi, torch.tensor(length - 1)) - lo + 1).clamp(min=0).sum())
    return total


def softmax_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """4 * Hq * D per visible pair: 2 for Q K^T, 2 for P V (exp and scaling not counted)."""
    pairs = visible_pairs(seq, seq, causal=cfg.causal, window=cfg.window_bounds, seq_lens=seq_lens)
    if seq_lens is None:
        pairs *= batch
    return 4.0 * cfg.heads * cfg.head_dim * pairs
