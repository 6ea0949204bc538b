"""Normalised attention through a positive feature map (linear attention's core), shared by
linear (phi = elu + 1) and performer (FAVOR+ random features).

Given query features fq [B, T, Hq, M], key features fk [B, T, Hkv, M] and values
v [B, T, Hkv, D], query i's output is

    o_i = sum_j fq_i . fk_j  v_j  /  (sum_j fq_i . fk_j + EPS)        over the keys j query i sees

(causal: j <= i; key padding: j < seq_lens[b]). Padded keys get zero features, so they add
nothing to either sum. A query that sees no key gets zeros. EPS = 1e-6, as in the linear
attention paper's code: without it a denominator that underflows (every feature of a query or
of its few keys ~0) sends 1 / den, and the gradient, to inf. A map whose key features carry a
constant factor s per sequence and head (performer's stabiliser) passes ``eps`` = EPS * s [B, Hkv]:
the floor then scales with the sums and the factor cancels, so it cannot carry later keys into
earlier rows.

`quadratic` is the definition (a T x T weight matrix, the ground truth); `chunked` is the
linear-cost form: bidirectional by one K^T V state, causal by prefix sums of per-chunk states
(exact within a chunk, a running state across chunks), no T x T tensor.

`elu_plus_one` is linear attention's phi, here on the floor that linear.py and its decode step
(models/state_decode.py) both stand on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench.kernels import reference
from attnbench.models.float32_forms import outside_autocast


def key_padding(length: int, seq_lens: torch.Tensor | None, device) -> torch.Tensor | None:
    """Which keys are real: bool [B, T, 1, 1] (broadcasts over [B, T, H, M]), or None without padding."""
    if seq_lens is None:
        return None
    return (torch.arange(length, device=device)[None, :] < seq_lens.to(device)[:, None])[:, :, None, None]


EPS = 1e-6


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, elementwise on [B, T, H, D], as x + 1 (x > 0) and exp(x) (x <= 0):
    ``F.elu(x) + 1`` computes exp(x) - 1 + 1, which cancels to 0 for x below -5 in bf16 (-17 in
    fp32); a query whose features all vanish then had a zero normaliser (GPT small diverged)."""
    return torch.exp(x.clamp(max=0)) + x.clamp(min=0)


def _divide(num: torch.Tensor, den: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """num [B, ..., H, D] / (den [B, ..., H] + eps), eps a float or [B, Hkv] (H a multiple of Hkv).
    Features are positive: den == 0 only when no key is visible; then num == 0 too and o = 0."""
    if isinstance(eps, torch.Tensor):
        b, h = den.shape[0], den.shape[-1]
        eps = eps.repeat_interleave(h // eps.shape[1], dim=1).view(b, *[1] * (den.ndim - 2), h)
    return num / (den + eps).unsqueeze(-1)


def _repeat_kv_heads(fk: torch.Tensor, v: torch.Tensor, hq: int) -> tuple[torch.Tensor, torch.Tensor]:
    group = hq // fk.shape[2]
    return fk.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)


def quadratic(fq, fk, v, *, causal: bool, seq_lens: torch.Tensor | None = None, eps: float | torch.Tensor = EPS) -> torch.Tensor:
    """The definition: weights W = fq fk^T [B, H, T, T], masked, row-normalised; o [B, T, Hq, D]."""
    fk, v = _repeat_kv_heads(fk, v, fq.shape[2])
    t = fq.shape[1]
    weights = torch.einsum("bihm,bjhm->bhij", fq, fk)  # (B, H, T, T)
    visible = reference.visible(t, t, causal=causal, seq_lens=seq_lens, device=fq.device)  # (B|1, 1, T, T)
    weights = weights.masked_fill(~visible, 0.0)
    num = torch.einsum("bhij,bjhd->bihd", weights, v)
    den = weights.sum(-1).transpose(1, 2)  # (B, T, H)
    return _divide(num, den, eps)


# under bf16 autocast the sums over T would lose the precision asked for here and, in training,
# the 1 / den gradients overflow (NaN after ~100 distillation steps)
@outside_autocast
def chunked(fq, fk, v, *, causal: bool, seq_lens: torch.Tensor | None = None, chunk: int = 64,
            eps: float | torch.Tensor = EPS) -> torch.Tensor:
    """The linear-cost form; fq [B, T, Hq, M], fk [B, T, Hkv, M], v [B, T, Hkv, D] -> o [B, T, Hq, D].

    Low-precision inputs are computed in float32 (the running states sum T terms) and the
    output is cast back. Memory: O(T / chunk * M * D) states, O(T * chunk) intra-chunk weights.
    """
    dtype = fq.dtype
    compute = torch.promote_types(dtype, torch.float32)
    fq, fk, v = fq.to(compute), fk.to(compute), v.to(compute)
    keep = key_padding(fk.shape[1], seq_lens, fk.device)
    if keep is not None:
        fk = fk * keep
    fk, v = _repeat_kv_heads(fk, v, fq.shape[2])
    if not causal:
        state = torch.einsum("bjhm,bjhd->bhmd", fk, v)  # (B, H, M, D)
        num = torch.einsum("bihm,bhmd->bihd", fq, state)
        den = torch.einsum("bihm,bhm->bih", fq, fk.sum(1))
        return _divide(num, den, eps).to(dtype)
    return _causal_chunks(fq, fk, v, chunk, eps).to(dtype)


def _causal_chunks(fq, fk, v, chunk: int, eps: float | torch.Tensor) -> torch.Tensor:
    b, t, h, m = fq.shape
    pad = -t % chunk  # zero features at the tail: they add nothing, their outputs are cut off
    fq, fk, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (fq, fk, v))
    n = (t + pad) // chunk
    fq, fk, v = (x.view(b, n, chunk, h, x.shape[-1]) for x in (fq, fk, v))  # (B, N, C, H, M|D)
    chunk_kv = torch.einsum("bncht,bnchd->bnhtd", fk, v)  # (B, N, H, M, D) each chunk's state
    chunk_k = fk.sum(2)  # (B, N, H, M)
    state_kv, state_k = _exclusive_cumsum(chunk_kv), _exclusive_cumsum(chunk_k)  # chunk n sees chunks 0 .. n-1
    num = torch.einsum("bnihm,bnhmd->bnihd", fq, state_kv)
    den = torch.einsum("bnihm,bnhm->bnih", fq, state_k)
    within = torch.einsum("bnihm,bnjhm->bnhij", fq, fk)  # (B, N, H, C, C)
    within = within * torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    num = num + torch.einsum("bnhij,bnjhd->bnihd", within, v)
    den = den + within.sum(-1).transpose(2, 3)
    return _divide(num, den, eps).reshape(b, n * chunk, h, -1)[:, :t]


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Prefix sums over dim 1 that exclude the current entry (shifted, not cumsum - x, which
    cancels catastrophically when the current entry dominates)."""
    return F.pad(x.cumsum(1), (0,) * (2 * (x.dim() - 2)) + (1, 0))[:, :-1]
