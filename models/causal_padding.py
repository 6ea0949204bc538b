"""Key padding in the causal-only mechanisms (stickbreaking, deltanet, nsa).

With right padding (``seq_lens[b]`` real tokens, then padding), a causal query at a real
position never sees a padded key, so padding can change only the outputs at padded
positions, which no loss reads. These mechanisms define those outputs as zeros: every impl,
including a peer kernel that knows nothing of padding, then gives the same full tensor.
"""

from __future__ import annotations

import torch


def zero_padded_queries(o: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """o [B, T, H, D] with the rows at positions t >= seq_lens[b] set to zero (o itself without padding)."""
    if seq_lens is None:
        return o
    real = torch.arange(o.shape[1], device=o.device)[None, :] < seq_lens.to(o.device)[:, None]  # (B, T)
    return o * real[:, :, None, None].to(o.dtype)
