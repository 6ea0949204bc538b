"""QKVAttention: the layer module of every mechanism whose core is a function of q, k, v.

Mechanisms differ in their impls and in the kernel options their layer passes
(``options(cfg)``); anything learnable beyond the projections comes by subclassing and
overriding ``core_options``.

Position schemes of the layer (``cfg.positions``, models/positions.py): a core whose options
carry ``theta`` rotates q and k itself (the softmax family, fused); for any other core the layer
rotates q and k before it. ALiBi needs a core that biases its scores: its options must carry the
``slopes``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from attnbench.models import positions
from attnbench.models.registry import Impl, LayerConfig


class QKVAttention(nn.Module):
    """Multi-head attention around a kernel-level core: fused q/k/v projection, core, output projection.

    x [B, T, C] -> q [B, T, Hq, D], k/v [B, T, Hkv, D] (views of one projection, no copy)
    -> attend -> o [B, T, Hq, D] -> [B, T, C]; an impl with run_packed gets the projection
    [B, T, Hq + 2 Hkv, D] whole instead (when attend is not overridden and the core rotates
    for itself). ``options(cfg)`` gives the mechanism's kernel options; tensors among them
    become buffers. ``theta``: the RoPE base when the layer rotates q and k before the core.
    A packed variable-length batch (x [total, C], FlashAttention's varlen layout) goes through
    ``forward_varlen`` with the core ``varlen_core`` binds to its pack (the same condition as
    run_packed: the layer adds nothing to its impl's core).
    """

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl], options: Callable[[LayerConfig], dict]):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.causal = cfg.causal
        self.qkv = nn.Linear(cfg.dim, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.run = impls[cfg.impl].run
        core_options = options(cfg)
        self.theta = positions.theta(cfg) if cfg.positions == "rope" and "theta" not in core_options else None
        if cfg.positions == "alibi" and "slopes" not in core_options:
            raise ValueError("this attention's core takes no ALiBi slopes")
        # a subclass that overrides attend adds to the core, so it always gets q, k, v apart
        plain = type(self).attend is QKVAttention.attend and self.theta is None
        self.run_packed = impls[cfg.impl].run_packed if plain else None
        self.varlen = impls[cfg.impl].varlen if plain else None
        self._plain_options = {}
        for name, value in core_options.items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value, persistent=False)
            else:
                self._plain_options[name] = value
        self._tensor_options = [name for name, _ in self.named_buffers(recurse=False)]

    def core_options(self) -> dict:
        return {**self._plain_options, **{name: getattr(self, name) for name in self._tensor_options}}

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] -> the fused projection [B, T, Hq + 2 Hkv, D]."""
        b, t, _ = x.shape
        return self.qkv(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q [B, T, Hq, D], k/v [B, T, Hkv, D] (views of the one fused projection)."""
        return self.packed(x).split([self.heads, self.kv_heads, self.kv_heads], dim=2)

    def positioned(self, q: torch.Tensor, k: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, Hq, D], k [B, S, Hkv, D] as the core takes them: rotated when the layer applies RoPE,
        keys at positions start .. start+S-1 and queries at the last T of them (a generate step: start > 0)."""
        return (q, k) if self.theta is None else positions.rotate_qk(q, k, self.theta, start)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel-level core: q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D]."""
        q, k = self.positioned(q, k)
        return self.run(q, k, v, causal=self.causal, seq_lens=seq_lens, **self.core_options())

    def varlen_core(self, cu_seqlens: torch.Tensor, max_seqlen: int) -> Callable[..., torch.Tensor]:
        """The core bound to one pack (registry.Varlen): attend(q [total, Hq, D], k/v [total, Hkv, D])
        -> o [total, Hq, D], with the layer's options; ValueError when its impl has no varlen form."""
        if self.varlen is None:
            raise ValueError("this layer's impl has no packed variable-length core")
        options = self.core_options()
        options.pop("offset", None)  # RoPE's: a pack's positions restart at 0 in every sequence
        return self.varlen.bind(cu_seqlens, max_seqlen, causal=self.causal, **options)

    def forward_varlen(self, x: torch.Tensor, core: Callable[..., torch.Tensor]) -> torch.Tensor:
        """A pack x [total, C] through the projections and ``core`` (varlen_core) -> [total, C]."""
        q, k, v = (part[0] for part in self.project(x[None]))  # [total, H, D] views of one projection
        return self.out(core(q, k, v).reshape(x.shape[0], self.heads * self.head_dim))

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.run_packed is not None:
            o = self.run_packed(self.packed(x), self.heads, causal=self.causal, seq_lens=seq_lens, **self.core_options())
        else:
            o = self.attend(*self.project(x), seq_lens)
        return self.out(o.reshape(b, t, self.heads * self.head_dim))


def qkv_layer(options: Callable[[LayerConfig], dict], impls: dict[str, Impl]) -> Callable[[LayerConfig], nn.Module]:
    """A layer factory: QKVAttention running ``impls[cfg.impl]`` with the kernel options ``options(cfg)``."""
    return functools.partial(QKVAttention, impls=impls, options=options)
