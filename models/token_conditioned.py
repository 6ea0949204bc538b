"""TokenConditionedAttention: QKVAttention whose core also takes per-token inputs computed
from x besides q, k, v (deltanet's write strengths beta, nsa's branch gates).

The kernel-level API has no slot for such inputs, so ``attend(q, k, v, seq_lens)`` (what the
kernel-level sweep times) lets the core use its documented default for them; ``forward``
computes them from x and passes them on.
"""

from __future__ import annotations

import torch

from attnbench.models.qkv import QKVAttention


class TokenConditionedAttention(QKVAttention):
    """x [B, T, C] -> q [B, T, Hq, D], k/v [B, T, Hkv, D] and ``token_options(x)`` -> core -> [B, T, C]."""

    def token_options(self, x: torch.Tensor) -> dict:
        """Per-token core inputs computed from x [B, T, C]; subclasses define them."""
        raise NotImplementedError

    def attend(self, q, k, v, seq_lens=None, **token_options) -> torch.Tensor:
        """The kernel-level core, q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]; without
        ``token_options`` the core's defaults stand in for them."""
        q, k = self.positioned(q, k)
        return self.run(q, k, v, causal=self.causal, seq_lens=seq_lens, **self.core_options(), **token_options)

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        o = self.attend(*self.project(x), seq_lens, **self.token_options(x))
        return self.out(o.reshape(b, t, self.heads * self.head_dim))
