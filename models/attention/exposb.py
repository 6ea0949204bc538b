"""exposb: RoPE whose rotation is modulated by 1 + alpha * exp(-lam * pos), a learnable band
filter beta + gamma * exp(-(j - mu)^2 / (2 sigma^2)) over the head dimension, and a
multiplicative distance decay exp(-delta * |m - n|) on the scores (issue #5; the math is in
kernels/exposb.py). Seven learnable parameters per query head.

Parametrisation: lam = softplus(raw_lam) > 0, sigma = softplus(raw_sigma) > 0,
delta = softplus(raw_delta) >= 0 (an initial delta of 0 stores raw_delta = -inf: the decay is
then off for good, its gradient 0); alpha, beta, gamma, mu are used as they are. The layer
hands the constrained values to the kernel, so autograd differentiates the softplus.

Decode: exact against a KV cache of the raw keys (k' depends on the query head's parameters, so
the cache keeps k as projected and exposb_step transforms it with the query's step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.kernels import reference
from attnbench.models import peers, positions
from attnbench.models.pair_flops import softmax_flops
from attnbench.models.qkv import QKVAttention
from attnbench.models.registry import Impl, LayerConfig, Mechanism
from attnbench.models.softmax_decode import KVCache, full_cache_decode
from attnbench.models.softmax import _triton_missing

DEFAULTS = {
    "decay_factor": (0.98, "exp(-lam): per-position decay of the rotation's modulation (0 < x < 1); lam = -ln x"),
    "alpha": (0.1, "modulation strength: cos/sin scaled by 1 + alpha * exp(-lam * pos)"),
    "beta": (1.0, "band filter base: channel j scaled by beta + gamma * band(j)"),
    "gamma": (0.0, "band filter gain on the Gaussian band exp(-(j - mu)^2 / (2 sigma^2))"),
    "mu": ("D/2", "band centre over the head dimension"),
    "sigma": ("D/4", "band width (> 0)"),
    "delta": (0.001, "score decay rate: scores times exp(-delta * |m - n|) (>= 0)"),
}
PARAMETERS = ("lam", "alpha", "beta", "gamma", "mu", "sigma", "delta")  # per query head, the kernels' keywords
POSITIVE = ("lam", "sigma", "delta")  # stored through softplus


def initial_values(cfg: LayerConfig) -> dict[str, float]:
    """The constrained initial parameter values from ``cfg.options`` (defaults: DEFAULTS)."""
    if cfg.window is not None:
        raise ValueError("exposb has no sliding-window form")
    unknown = set(cfg.options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown exposb options {sorted(unknown)}; valid: {', '.join(DEFAULTS)}")
    option = {name: default for name, (default, _) in DEFAULTS.items()}
    option.update({"mu": cfg.head_dim / 2, "sigma": cfg.head_dim / 4}, **cfg.options)
    values = {name: float(option[name]) for name in ("alpha", "beta", "gamma", "mu", "sigma", "delta")}
    decay_factor = float(option["decay_factor"])
    if not 0 < decay_factor < 1:
        raise ValueError(f"exposb decay_factor must be in (0, 1), not {decay_factor}")
    if values["sigma"] <= 0 or values["delta"] < 0:
        raise ValueError(f"exposb needs sigma > 0 and delta >= 0, not sigma={values['sigma']}, delta={values['delta']}")
    return {"lam": -math.log(decay_factor), **values}


def inverse_softplus(value: float) -> float:
    """raw with softplus(raw) == value (value >= 0; 0 gives -inf)."""
    return value + math.log(-math.expm1(-value)) if value > 0 else -math.inf


class ExpoSBAttention(QKVAttention):
    """QKVAttention plus the seven per-query-head ExpoSB parameters (raw, nn.Parameter [Hq] each)."""

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl]):
        super().__init__(cfg, impls, lambda cfg: {})
        for name, value in initial_values(cfg).items():
            raw = inverse_softplus(value) if name in POSITIVE else value
            setattr(self, f"raw_{name}", nn.Parameter(torch.full((cfg.heads,), raw)))

    def learned_parameters(self) -> dict[str, torch.Tensor]:
        """The seven per-head values as trained (what `attnbench train` reports), [Hq] each."""
        return self.core_options()

    def core_options(self) -> dict:
        """The constrained values, float32 [Hq] each, as the kernels take them."""
        return {
            "lam": F.softplus(self.raw_lam),
            "alpha": self.raw_alpha,
            "beta": self.raw_beta,
            "gamma": self.raw_gamma,
            "mu": self.raw_mu,
            "sigma": F.softplus(self.raw_sigma),
            "delta": F.softplus(self.raw_delta),
        }


def triton_exposb(q, k, v, **options):
    """Ours: the fused Triton kernel (kernels/exposb.py)."""
    from attnbench.kernels.exposb import exposb_attention_triton

    return exposb_attention_triton(q, k, v, **options)


def flex_exposb(q, k, v, *, lam, alpha, beta, gamma, mu, sigma, delta, causal=False, seq_lens=None, compiled=True):
    """The best unfused alternative: q', k' computed in torch (k' per query head), then
    FlexAttention with the distance decay as a score_mod and causal/padding as a block mask."""
    b, t, hq, _ = q.shape
    s = k.shape[1]
    params = dict(lam=lam, alpha=alpha, beta=beta, gamma=gamma, mu=mu, sigma=sigma)
    q = reference.exposb_transform(q, torch.arange(s - t, s, device=q.device), **params)
    k = reference.exposb_transform(k.repeat_interleave(hq // k.shape[2], dim=2), torch.arange(s, device=q.device), **params)
    v = v.repeat_interleave(hq // v.shape[2], dim=2)
    block_mask = None
    if causal or seq_lens is not None:
        lens_key = None if seq_lens is None else tuple(seq_lens.tolist())
        block_mask = peers._block_mask(b, t, s, causal, None, lens_key, str(q.device))
    shift = s - t
    rate = delta.float()

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score * torch.exp(-rate[head] * (q_idx + shift - kv_idx).abs())

    if compiled:
        flex_attention = peers.compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention
    o = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=block_mask)
    return o.transpose(1, 2)


def _triton_unsupported(cfg: LayerConfig, device, dtype) -> str | None:
    d = cfg.head_dim
    return None if 32 <= d <= 256 and d & (d - 1) == 0 else f"the exposb kernel needs head_dim a power of two in [32, 256], not {d}"


def exposb_step(q, k_cache, v_cache, lengths, **params) -> torch.Tensor:
    """One decode step by definition: q [B, N, Hq, D], the N newest tokens of each sequence (positions
    lengths[b] - N ..), k/v_cache [B, L, Hkv, D] raw keys and values in rows 0 .. lengths[b] - 1,
    params the seven [Hq] values -> o [B, N, Hq, D]. Each sequence is the causal forward's last N
    rows over its own tokens (a host read of lengths: the plain-torch form)."""
    rows = [reference.exposb_attention(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], causal=True, **params)
            for b, n in enumerate(lengths.tolist())]
    return torch.cat(rows)


def _cache(layer, capacity: int) -> KVCache:
    """The raw keys (exposb transforms them per query head), read by exposb_step with the layer's
    parameters as they are when the cache is made."""
    return KVCache(layer, capacity, exposb_step, {name: value.detach() for name, value in layer.core_options().items()})


DECODE = full_cache_decode(
    exposb_step, lambda cfg, device: {name: torch.full((cfg.heads,), value, device=device) for name, value in initial_values(cfg).items()},
    _cache, "plain torch decode step by definition (exposb_step, k' formed each step)",
)

IMPLS = {
    "triton": Impl(
        "triton", triton_exposb, "ours: fused Triton flash attention with ExpoSB in registers",
        needs_cuda=True, missing=_triton_missing, unsupported=_triton_unsupported,
    ),
    "torch": Impl("torch", reference.exposb_attention, "plain torch reference (T x T scores in memory)"),
    "flex": Impl("flex", flex_exposb, "q', k' in torch, then compiled FlexAttention with a decay score_mod", needs_cuda=True),
}

MECHANISM = Mechanism(
    name="exposb",
    description="RoPE with decaying modulation, learnable band filter and multiplicative distance decay, fused",
    family="exact",
    layer=lambda cfg: ExpoSBAttention(cfg, IMPLS),
    impls=IMPLS,
    flops=softmax_flops,
    position="inside",
    refuses=positions.own_scheme_only("exposb encodes positions itself (a modulated rotation and a distance decay)"),
    params=DEFAULTS,
    decode=DECODE,
)
