"""hopfield: modern Hopfield association (Ramsauer et al. 2021, "Hopfield Networks is All You Need").

The keys are the stored patterns, each query the initial state pattern xi_0. An update step
retrieves a pattern from the keys with an inverse temperature beta per query head,

    xi_s = softmax(beta * xi_{s-1} K^T) K          s = 1 .. n_steps - 1  (the new state query)
    o    = softmax(beta * xi_{n_steps-1} K^T) V     (the last step reads out the values)

each softmax over the keys the query may see (causal, key padding). With one step and
beta = 1/sqrt(D) this is softmax attention. beta = exp(log_beta) is learned per head (positive
by parametrisation) and starts at 1/sqrt(D); large beta retrieves single patterns, small beta
averages (metastable states). Positions come from the model, or from the layer: RoPE rotates
q and k before the core (the stored patterns are the rotated keys); ALiBi (``slopes`` [Hq])
biases the scores of every step.

Impls: the definition (kernels/reference.py, T x T scores) and one SDPA call per step
(flash / memory-efficient backends: no T x T tensor without a mask).

Decode: exact against a KV cache of every earlier key (rotated under RoPE): hopfield_step runs
the n_steps updates of each new query over the cache (models/decode.softmax_step per update).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnbench.kernels import reference
from attnbench.models import peers, positions
from attnbench.models.decode import positions_of_new, rope_at, softmax_step
from attnbench.models.pair_flops import visible_pairs
from attnbench.models.qkv import QKVAttention
from attnbench.models.registry import Impl, LayerConfig, Mechanism
from attnbench.models.softmax_decode import KVCache, full_cache_decode

DEFAULT_STEPS = 1


def _steps(attend, q, k, v, n_steps: int):
    """n_steps - 1 retrievals from the keys, then one from the values; attend(xi, k, v) -> o."""
    state = q
    for _ in range(n_steps - 1):
        state = attend(state, k, k)
    return attend(state, k, v)


def torch_reference(q, k, v, *, causal=False, seq_lens=None, beta, n_steps=DEFAULT_STEPS, slopes=None):
    """The definition: q [B, T, Hq, D], k/v [B, T, Hkv, D], beta [Hq] > 0 -> [B, T, Hq, D]."""
    scale = beta.to(q.dtype).view(1, 1, -1, 1)

    def attend(state, keys, values):
        return reference.attention(state * scale, keys, values, causal=causal, seq_lens=seq_lens, slopes=slopes, scale=1.0)

    return _steps(attend, q, k, v, n_steps)


def sdpa_steps(q, k, v, *, causal=False, seq_lens=None, beta, n_steps=DEFAULT_STEPS, slopes=None):
    """One F.scaled_dot_product_attention call per step; beta enters by rescaling the state
    (SDPA divides by sqrt(D) itself)."""
    scale = (beta * math.sqrt(q.shape[-1])).to(q.dtype).view(1, 1, -1, 1)

    def attend(state, keys, values):
        return peers.sdpa(state * scale, keys, values, causal=causal, seq_lens=seq_lens, slopes=slopes)

    return _steps(attend, q, k, v, n_steps)


class HopfieldAttention(QKVAttention):
    """QKVAttention with a learned inverse temperature per query head: beta = exp(log_beta)."""

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl]):
        super().__init__(cfg, impls, hopfield_options)
        self.log_beta = nn.Parameter(torch.full((cfg.heads,), -0.5 * math.log(cfg.head_dim)))

    def core_options(self) -> dict:
        return {**super().core_options(), "beta": self.log_beta.exp()}


def hopfield_step(q, k_cache, v_cache, lengths, *, beta, n_steps=DEFAULT_STEPS, slopes=None, theta=None) -> torch.Tensor:
    """One decode step by definition: q [B, N, Hq, D], the N newest tokens of each sequence (rotated
    here at their positions when theta), k/v_cache [B, L, Hkv, D] (keys as the core sees them), beta
    [Hq] -> o [B, N, Hq, D]: the updates of _steps, each a softmax step over the cache."""
    if theta is not None:
        q = rope_at(q, positions_of_new(lengths.to(q.device), q.shape[1]), theta)
    scale = beta.to(q.dtype).view(1, 1, -1, 1)

    def attend(state, keys, values):
        return softmax_step(state * scale, keys, values, lengths, slopes=slopes, scale=1.0)

    return _steps(attend, q, k_cache, v_cache, n_steps)


def _cache(layer, capacity: int) -> KVCache:
    """Every earlier key (rotated under the layer's RoPE), read by hopfield_step."""
    options = layer.core_options()
    return KVCache(layer, capacity, hopfield_step, {
        "beta": options["beta"].detach(), "n_steps": options["n_steps"], "slopes": options.get("slopes"), "theta": layer.theta})


def _step_options(cfg: LayerConfig, device) -> dict:
    options = hopfield_options(cfg)
    slopes = options.get("slopes")
    beta = torch.full((cfg.heads,), cfg.head_dim**-0.5, device=device)  # the layer's initial beta
    return {"beta": beta, "n_steps": options["n_steps"], "slopes": None if slopes is None else slopes.to(device)}


def hopfield_options(cfg: LayerConfig) -> dict:
    n_steps = int(cfg.options.get("n_steps", DEFAULT_STEPS))
    if n_steps <= 0:
        raise ValueError(f"hopfield n_steps must be positive, not {n_steps}")
    return {"n_steps": n_steps, **positions.alibi_option(cfg)}


def hopfield_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """n_steps softmax attentions over the same visible pairs (no window: hopfield takes none),
    each 4 * Hq * D per pair: 2 for the scores, 2 for P K or P V."""
    pairs = visible_pairs(seq, seq, causal=cfg.causal, window=None, seq_lens=seq_lens)
    if seq_lens is None:
        pairs *= batch
    return hopfield_options(cfg)["n_steps"] * 4.0 * cfg.heads * cfg.head_dim * pairs


DECODE = full_cache_decode(
    hopfield_step, _step_options, _cache, "plain torch decode step by definition (hopfield_step: each update over the cache)",
    unsupported=lambda cfg, queries, device, dtype: (
        "the kernel-level step takes no RoPE (the layer rotates: --level layer or model)" if cfg.positions == "rope" else None),
)

IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition (T x T scores in memory)"),
    "sdpa": Impl("sdpa", sdpa_steps, "one F.scaled_dot_product_attention call per update step"),
}

MECHANISM = Mechanism(
    name="hopfield",
    description="modern Hopfield association: learned-beta softmax retrieval, optional repeated updates (Ramsauer et al. 2021)",
    family="exact",
    layer=lambda cfg: HopfieldAttention(cfg, IMPLS),
    impls=IMPLS,
    flops=hopfield_flops,
    params={"n_steps": (DEFAULT_STEPS, "update steps: n_steps - 1 retrievals from the keys, then one from the values")},
    decode=DECODE,
)
