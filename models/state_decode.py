"""The one-token recurrent steps of linear attention and DeltaNet, in plain torch: the ground
truth of the fused Triton steps (kernels/state_decode.py) and what a generate loop calls.

One token per sequence: q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv]; GQA: query head h reads
kv head h // (Hq / Hkv)'s state, as the full-sequence forms do. States are per kv head, in
float32 (or wider) whatever the inputs' dtype, and every step computes in the state's dtype;
the output comes back in q's dtype. A step returns (o [B, Hq, Dv], the new state) and leaves
the old one as it was.

- linear (models/attention/linear.py): kv = sum_j phi(k_j) v_j^T [B, Hkv, Dk, Dv] and
  k_sum = sum_j phi(k_j) [B, Hkv, Dk]; o = phi(q) kv / (phi(q) . k_sum + EPS), phi = elu + 1.
- deltanet (models/attention/deltanet.py): S [B, Hkv, Dk, Dv] (the transpose of that file's
  [Dv, Dk], fla's layout), q and k L2-normalised, beta [B, Hkv] (1/2 when None):
  S += k (beta (v - S^T k))^T, o = S^T q.

Every form here computes with autocast off (outside_autocast): a float32 state stays float32
under a bf16 autocast. A generate loop keeps a `LinearCache` or `DeltaNetCache` per layer; it steps
by these torch steps, or by our fused Triton kernels (fused_linear_step, fused_deltanet_step: the
same signature, but the float32 state takes the token in place and comes back).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from attnbench.models.feature_attention import EPS, elu_plus_one as feature_map
from attnbench.models.float32_forms import outside_autocast


class LinearState(NamedTuple):
    """Linear attention's state: kv [B, Hkv, Dk, Dv], k_sum [B, Hkv, Dk]."""

    kv: torch.Tensor
    k_sum: torch.Tensor


def why_no_step(cfg, queries: int) -> str | None:
    """Why these steps cannot run a decode case of LayerConfig ``cfg`` with ``queries`` new tokens, or None."""
    if queries != 1:
        return "a recurrent step takes one token at a time (--queries 1); N tokens at once is a chunked prefill, not built"
    if cfg.positions == "rope":
        return "the recurrent steps take no RoPE (q and k would be rotated before the step; not built)"
    return None


def why_no_fla_step(cfg, queries: int) -> str | None:
    """why_no_step's reasons, and fla's fused_recurrent kernels taking one head count for q, k and v."""
    if cfg.heads != cfg.kv_heads:
        return f"fla's fused_recurrent steps take as many query heads as kv heads (here {cfg.heads} and {cfg.kv_heads})"
    return why_no_step(cfg, queries)


def _groups(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hkv, G, D], the query heads of each kv head together."""
    b, hq, d = q.shape
    return q.reshape(b, kv_heads, hq // kv_heads, d)


@outside_autocast
def linear_state(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> LinearState:
    """The state after the tokens of k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] (T = 0: the empty state)."""
    work = torch.promote_types(dtype, k.dtype)
    fk, v = feature_map(k.to(work)), v.to(work)
    return LinearState(torch.einsum("bthk,bthv->bhkv", fk, v).to(dtype), fk.sum(1).to(dtype))


@outside_autocast
def linear_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState) -> tuple[torch.Tensor, LinearState]:
    """Adds the token (k [B, Hkv, Dk], v [B, Hkv, Dv]) to ``state`` and reads it with q [B, Hq, Dk]."""
    work = state.kv.dtype
    fk = feature_map(k.to(work))
    kv = state.kv + fk[..., :, None] * v.to(work)[..., None, :]
    k_sum = state.k_sum + fk
    return feature_readout(feature_map(q.to(work)), kv, k_sum).to(q.dtype), LinearState(kv, k_sum)


def feature_readout(fq: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, eps: float | torch.Tensor = EPS) -> torch.Tensor:
    """A normalised feature-map state read by query features fq [B, Hq, M]: kv [B, Hkv, M, Dv],
    k_sum [B, Hkv, M] -> o [B, Hq, Dv] = fq kv / (fq . k_sum + eps), in the state's dtype (linear
    attention's and Performer's readout; GQA: query head h reads kv head h // (Hq / Hkv)); eps a
    float or [B, Hkv] (models/feature_attention.py)."""
    fq = _groups(fq, kv.shape[1])  # (B, Hkv, G, M)
    num = torch.einsum("bhgm,bhmv->bhgv", fq, kv)
    den = torch.einsum("bhgm,bhm->bhg", fq, k_sum)
    floor = eps[..., None] if isinstance(eps, torch.Tensor) else eps
    return (num / (den + floor)[..., None]).flatten(1, 2)


def _delta_write(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """S + k (beta (v - S^T k))^T for normalised k [B, Hkv, Dk], v [B, Hkv, Dv], beta [B, Hkv]."""
    error = v - torch.einsum("bhkv,bhk->bhv", state, k)
    return state + k[..., :, None] * (beta[..., None] * error)[..., None, :]


def _unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., D] L2-normalised in ``dtype`` (as deltanet's forms normalise q and k)."""
    return F.normalize(x.to(dtype), dim=-1)


def _write_strength(beta: torch.Tensor | None, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """beta [B, Hkv] in ``dtype``; None: 1/2, deltanet's kernel-level default."""
    return torch.full(k.shape[:2], 0.5, dtype=dtype, device=k.device) if beta is None else beta.to(dtype)


@outside_autocast
def deltanet_state(
    k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """S [B, Hkv, Dk, Dv] after the tokens of k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], beta [B, T, Hkv]
    (None: 1/2), written one by one from S = 0."""
    b, t, hkv, dk = k.shape
    state = torch.zeros(b, hkv, dk, v.shape[-1], dtype=torch.promote_types(dtype, k.dtype), device=k.device)
    for i in range(t):
        beta_i = _write_strength(None if beta is None else beta[:, i], k[:, i], state.dtype)
        state = _delta_write(state, _unit(k[:, i], state.dtype), v[:, i].to(state.dtype), beta_i)
    return state.to(dtype)


@outside_autocast
def deltanet_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, beta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes the token (k [B, Hkv, Dk], v [B, Hkv, Dv], beta [B, Hkv] or None) into S [B, Hkv, Dk, Dv]
    and reads the new S with q [B, Hq, Dk]."""
    work = state.dtype
    state = _delta_write(state, _unit(k, work), v.to(work), _write_strength(beta, k, work))
    o = torch.einsum("bhkv,bhgk->bhgv", state, _groups(_unit(q, work), k.shape[1]))
    return o.flatten(1, 2).to(q.dtype), state


def fused_linear_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState) -> tuple[torch.Tensor, LinearState]:
    """linear_step by our fused Triton kernel (kernels/state_decode.linear_step): the same o [B, Hq, Dv]
    in q's dtype, but ``state``'s float32 kv [B, Hkv, Dk, Dv] and k_sum [B, Hkv, Dk] take the token in
    place and come back as the new state."""
    from attnbench.kernels.state_decode import linear_step as fused  # triton is imported only where a fused step runs

    return fused(q, k, v, *state), state


def fused_deltanet_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, beta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """deltanet_step by our fused Triton kernel (kernels/state_decode.deltanet_step): the same o
    [B, Hq, Dv] in q's dtype, but the float32 S [B, Hkv, Dk, Dv] takes the token in place and comes back."""
    from attnbench.kernels.state_decode import deltanet_step as fused  # triton is imported only where a fused step runs

    return fused(q, k, v, state, beta), state


class StateCache:
    """A recurrent layer's state in a generate loop (DecodeForm.layer_cache), whatever the capacity:
    the layer's forward over the prompt, then one token at a time by the steps above. ``layer``: the
    mechanism's QKVAttention (RoPE, when the layer applies it, rotates q and k at their positions)."""

    def __init__(self, layer, capacity: int):
        self.layer, self.length, self.state = layer, 0, None

    def begin(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor):
        """The state after the prompt's k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] (x [B, T, C]: the layer's input)."""
        raise NotImplementedError

    def advance(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor):
        """(o [B, Hq, Dv], the new state) of one token q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv], x [B, 1, C]."""
        raise NotImplementedError

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward over the prompt x [B, T, C] -> [B, T, C]; the state after it kept."""
        q, k, v = self.layer.project(x)
        _, k = self.layer.positioned(q, k)
        self.state, self.length = self.begin(k, v, x), x.shape[1]
        return self.layer(x)

    def fill(self, batch: int, context: int, device, dtype) -> None:
        """As if ``context`` tokens of B sequences had been read: the state of one random token (a step's
        work does not depend on what the state holds), at position ``context``."""
        x = torch.randn(batch, 1, self.layer.qkv.in_features, device=device, dtype=dtype)
        _, k, v = self.layer.project(x)
        self.state, self.length = self.begin(k, v, x), context

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, C] of the token at position ``length`` -> [B, 1, C]."""
        q, k, v = self.layer.project(x)
        q, k = self.layer.positioned(q, k, self.length)
        o, self.state = self.advance(q[:, 0], k[:, 0], v[:, 0], x)
        self.length += 1
        return self.layer.out(o.reshape(x.shape[0], 1, -1))


class FusedStateCache(StateCache):
    """A StateCache with our fused Triton step beside its torch one. ``state_step``: the one-token
    step, ``torch_step`` (None) or ``fused_step`` (`speed --impl triton` at the layer and model
    decode levels). The torch step replaces the state by a new one; the fused one writes the
    float32 state in place, so a cache_snapshot (models/generate.py) taken before it restores the
    length but not the state."""

    torch_step: Callable
    fused_step: Callable

    def __init__(self, layer, capacity: int, state_step: Callable | None = None):
        super().__init__(layer, capacity)
        self.state_step = state_step or self.torch_step


class LinearCache(FusedStateCache):
    """Linear attention's LinearState (kv [B, Hkv, Dk, Dv], k_sum [B, Hkv, Dk], float32)."""

    torch_step = staticmethod(linear_step)
    fused_step = staticmethod(fused_linear_step)

    def begin(self, k, v, x):
        return linear_state(k, v)

    def advance(self, q, k, v, x):
        return self.state_step(q, k, v, self.state)


class DeltaNetCache(FusedStateCache):
    """DeltaNet's S [B, Hkv, Dk, Dv] (float32); beta from the layer's own projection of x."""

    torch_step = staticmethod(deltanet_step)
    fused_step = staticmethod(fused_deltanet_step)

    def begin(self, k, v, x):
        return deltanet_state(k, v, self.layer.token_options(x)["beta"])

    def advance(self, q, k, v, x):
        return self.state_step(q, k, v, self.state, self.layer.token_options(x)["beta"][:, 0])
