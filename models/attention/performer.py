"""performer: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers"):
softmax attention approximated by positive orthogonal random features,

    exp(q.k / sqrt(D)) ~= phi(q) . phi(k),   phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M),  x' = x / D^(1/4)

with W [M, D] random Gaussian rows made orthogonal in blocks of D (QR) and rescaled to
Gaussian norms, then normalised feature-map attention (models/feature_attention.py):
linear cost, bidirectional by one K^T V state, causal by chunked prefix sums.

Numerical stabilisers (as in the paper's code), each a constant that cancels in the ratio:
a query's features are divided by exp of its own largest exponent; all keys of one sequence
and head by exp of the largest exponent over its real keys, s = exp(-largest). The key constant
is shared by the whole sequence, later keys among them, so the normaliser's floor is scaled by it
too (EPS * s, models/feature_attention.py): the constant cancels, floor included, and under causal
masking later keys change earlier outputs only by rounding (tests/models/test_layer_causality.py,
float64; until 2026-12-04 the floor was EPS alone, which let a later key with a larger exponent
move every earlier row by up to ~1e-3).

The layer holds W as a buffer, shared by all heads, saved with the model, and redrawn every
``redraw_every`` training steps (0 = never) or on demand with ``redraw_features()``.

Decode (causal): the state of the keys so far, PerformerState, one token at a time
(performer_step). Its key stabiliser is the largest exponent seen so far, and the state is
rescaled when a larger one arrives (as an online softmax rescales), so after the last token it
is the full forward's constant and the step equals the causal forward's last row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from attnbench.kernels import decode_cost
from attnbench.models import feature_attention, state_decode
from attnbench.models.float32_forms import outside_autocast
from attnbench.models.qkv import QKVAttention
from attnbench.models.registry import MATMUL_BACKWARD, DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism

DEFAULT_FEATURES = 256
DEFAULT_REDRAW_EVERY = 1000
DEFAULT_CHUNK = 64


def orthogonal_features(features: int, head_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """W [features, head_dim], float32: blocks of head_dim orthonormal rows (QR of a Gaussian
    matrix), each row rescaled to the norm of an independent Gaussian vector, so every row is
    marginally N(0, I) while rows within a block are exactly orthogonal."""
    blocks = []
    for _ in range(math.ceil(features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        orthonormal, _ = torch.linalg.qr(gaussian)
        blocks.append(orthonormal.T)  # rows orthonormal
    rows = torch.cat(blocks)[:features]
    norms = torch.randn(features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).float()


def _exponents(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """W x' - |x'|^2 / 2 for x [B, T, H, D] -> [B, T, H, M], x' = x / D^(1/4)."""
    x = x * x.shape[-1] ** -0.25
    return x @ projection.to(x.dtype).T - x.square().sum(-1, keepdim=True) / 2


def query_features(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(q) [B, T, Hq, M], divided by each query's own largest term (cancels in its ratio)."""
    exponents = _exponents(q, projection)
    return torch.exp(exponents - exponents.amax(-1, keepdim=True).detach()) / math.sqrt(projection.shape[0])


def key_features(k: torch.Tensor, projection: torch.Tensor, seq_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(k) [B, T, Hkv, M] divided by exp of the largest term over the real keys of each sequence
    and head, the normaliser's floor EPS times that factor [B, Hkv]): one constant per sequence and
    head, which cancels in every ratio, floor included."""
    exponents = _exponents(k, projection)
    keep = feature_attention.key_padding(k.shape[1], seq_lens, k.device)
    if keep is not None:  # padded keys: exp(-inf) = 0 exactly, whatever their values
        exponents = exponents.masked_fill(~keep, float("-inf"))
    largest = exponents.amax(dim=(1, 3), keepdim=True).detach()
    largest = largest.nan_to_num(0.0, neginf=0.0)  # a sequence with no real key
    return torch.exp(exponents - largest) / math.sqrt(projection.shape[0]), _floor(largest[:, 0, :, 0])


def _floor(largest: torch.Tensor) -> torch.Tensor:
    """The normaliser's floor [B, Hkv] for key features divided by exp(largest [B, Hkv])."""
    return feature_attention.EPS * torch.exp(-largest)


def torch_reference(q, k, v, *, causal=False, seq_lens=None, projection, chunk=DEFAULT_CHUNK):
    """The definition, with the T x T weight matrix; q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    fq, (fk, eps) = query_features(q, projection), key_features(k, projection, seq_lens)
    return feature_attention.quadratic(fq, fk, v, causal=causal, seq_lens=seq_lens, eps=eps)


def chunked(q, k, v, *, causal=False, seq_lens=None, projection, chunk=DEFAULT_CHUNK):
    """Linear cost: K^T V state (bidirectional) or per-chunk prefix sums (causal)."""
    fq, (fk, eps) = query_features(q, projection), key_features(k, projection, seq_lens)
    return feature_attention.chunked(fq, fk, v, causal=causal, seq_lens=seq_lens, chunk=chunk, eps=eps)


class PerformerState(NamedTuple):
    """The keys so far of B sequences, per kv head: kv [B, Hkv, M, Dv] = sum_j phi_j v_j^T and
    k_sum [B, Hkv, M] = sum_j phi_j, phi_j = exp(e_j - largest) / sqrt(M) (e_j: key j's exponents,
    _exponents), largest [B, Hkv] the largest exponent so far (-inf before any key)."""

    kv: torch.Tensor
    k_sum: torch.Tensor
    largest: torch.Tensor


@outside_autocast
def performer_state(k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, dtype: torch.dtype = torch.float32) -> PerformerState:
    """The state after the tokens of k [B, T, Hkv, D], v [B, T, Hkv, Dv] (T = 0: the empty state)."""
    work = torch.promote_types(dtype, k.dtype)
    b, t, hkv, _ = k.shape
    exponents = _exponents(k.to(work), projection.to(work))  # (B, T, Hkv, M)
    largest = exponents.amax(dim=(1, 3)) if t else torch.full((b, hkv), float("-inf"), dtype=work, device=k.device)
    features = torch.exp(exponents - largest[:, None, :, None]) / math.sqrt(projection.shape[0])
    kv = torch.einsum("bthm,bthv->bhmv", features, v.to(work))
    return PerformerState(kv.to(dtype), features.sum(1).to(dtype), largest.to(dtype))


@outside_autocast
def performer_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: PerformerState, projection: torch.Tensor
) -> tuple[torch.Tensor, PerformerState]:
    """Adds the token (k [B, Hkv, D], v [B, Hkv, Dv]) to ``state``, rescaled to the new largest
    exponent, and reads it with q [B, Hq, D]: (o [B, Hq, Dv] in q's dtype, the new state)."""
    work = state.kv.dtype
    projection = projection.to(work)
    exponents = _exponents(k.to(work)[:, None], projection)[:, 0]  # (B, Hkv, M)
    largest = torch.maximum(state.largest, exponents.amax(-1))
    rescale = torch.exp(state.largest - largest)  # 0 for the empty state (exp(-inf))
    features = torch.exp(exponents - largest[..., None]) / math.sqrt(projection.shape[0])
    kv = state.kv * rescale[..., None, None] + features[..., :, None] * v.to(work)[..., None, :]
    k_sum = state.k_sum * rescale[..., None] + features
    fq = query_features(q.to(work)[:, None], projection)[:, 0]  # (B, Hq, M)
    return state_decode.feature_readout(fq, kv, k_sum, _floor(largest)).to(q.dtype), PerformerState(kv, k_sum, largest)


class PerformerCache(state_decode.StateCache):
    """Performer's PerformerState in a generate loop, under the layer's own projection W."""

    def begin(self, k, v, x):
        return performer_state(k, v, self.layer.projection)

    def advance(self, q, k, v, x):
        return performer_step(q, k, v, self.state, self.layer.projection)


class PerformerAttention(QKVAttention):
    """QKVAttention whose random projection W [M, D] is a saved buffer, redrawn every
    ``redraw_every`` training forward passes (0 = never)."""

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl]):
        super().__init__(cfg, impls, performer_options)
        self.register_buffer("projection", self.projection, persistent=True)  # a trained model needs its W
        self.redraw_every = int(cfg.options.get("redraw_every", DEFAULT_REDRAW_EVERY))
        self.steps_since_redraw = 0

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh W (same shape, device and dtype)."""
        features, head_dim = self.projection.shape
        self.projection.copy_(orthogonal_features(features, head_dim, generator))

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.redraw_every:
            if self.steps_since_redraw == self.redraw_every:
                self.redraw_features()
                self.steps_since_redraw = 0
            self.steps_since_redraw += 1
        return super().forward(x, seq_lens)


def performer_options(cfg: LayerConfig) -> dict:
    features = int(cfg.options.get("features", DEFAULT_FEATURES))
    if features <= 0:
        raise ValueError(f"performer features must be positive, not {features}")
    return {
        "projection": orthogonal_features(features, cfg.head_dim),
        "chunk": int(cfg.options.get("chunk", DEFAULT_CHUNK)),
    }


def performer_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """Chunked form, per head and token, M features (exp and normalisation not counted):
    2*M*D for each of q and k (W x'), 2*M*D (phi(k) v^T into a state) + 2*M*D (phi(q) times it),
    and causal only: 2*C*M + 2*C*D (phi(q) phi(k)^T and P v within its chunk of C tokens)."""
    m, d = int(cfg.options.get("features", DEFAULT_FEATURES)), cfg.head_dim
    per_token = 2.0 * m * d * 2 + 4.0 * m * d
    if cfg.causal:
        per_token += 2.0 * int(cfg.options.get("chunk", DEFAULT_CHUNK)) * (m + d)
    return cfg.heads * batch * seq * per_token


IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition (T x T weights in memory)"),
    "chunked": Impl("chunked", chunked, "torch, linear cost: K^T V state / chunked prefix sums"),
}

def _features(cfg: LayerConfig) -> int:
    return int(cfg.options.get("features", DEFAULT_FEATURES))


def _torch_step(cfg, batch, context, queries, device, dtype):
    """One token q [B, Hq, D], k/v [B, Hkv, D] against the state of ``context`` random keys
    (what the state holds does not change the step's work)."""
    m, d = _features(cfg), cfg.head_dim
    projection = orthogonal_features(m, d).to(device)
    q = torch.randn(batch, cfg.heads, d, device=device, dtype=dtype)
    k, v = (torch.randn(batch, cfg.kv_heads, d, device=device, dtype=dtype) for _ in range(2))
    kv = 0.01 * torch.randn(batch, cfg.kv_heads, m, d, device=device)
    state = PerformerState(kv, torch.rand(batch, cfg.kv_heads, m, device=device) + 1.0, torch.zeros(batch, cfg.kv_heads, device=device))
    return lambda: performer_step(q, k, v, state, projection)[0]


def _state_bytes(cfg: LayerConfig) -> int:
    return decode_cost.performer_state_bytes(cfg.kv_heads, _features(cfg), cfg.head_dim)


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    d = cfg.head_dim
    projection = _features(cfg) * d * decode_cost.STATE_ITEMSIZE
    return decode_cost.state_step_bytes(batch, _state_bytes(cfg), cfg.heads, cfg.kv_heads, d, d, itemsize) + projection


DECODE = DecodeForm("state", _step_bytes, lambda cfg, context, queries, itemsize: _state_bytes(cfg), {
    "torch": DecodeImpl("torch", _torch_step, "plain torch one-token step, the stabiliser kept running (performer_step)",
                        unsupported=lambda cfg, queries, device, dtype: state_decode.why_no_step(cfg, queries)),
}, layer_cache=PerformerCache)

MECHANISM = Mechanism(
    name="performer",
    description="FAVOR+ positive orthogonal random features approximating softmax (Choromanski et al. 2021)",
    family="linear",
    layer=lambda cfg: PerformerAttention(cfg, IMPLS),
    impls=IMPLS,
    flops=performer_flops,
    backward_factor=MATMUL_BACKWARD,  # its backward is the gradients of its feature and state matmuls (nothing recomputed)
    refuses={"alibi": "performer's random-feature attention has no score matrix to bias (ALiBi needs scores before a softmax)"},
    params={
        "features": (DEFAULT_FEATURES, "random features M (approximation error falls as M grows)"),
        "redraw_every": (DEFAULT_REDRAW_EVERY, "redraw the random features every N training steps (0 = never)"),
        "chunk": (DEFAULT_CHUNK, "tokens per chunk of the causal prefix-sum form"),
    },
    decode=DECODE,
)
