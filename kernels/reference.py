"""Plain-torch references: the ground truth every kernel is tested against.

Written as the definitions, with the T x T score matrix in memory; they run anywhere and
in any dtype (tests run them on float64 copies of the inputs for the exact answer, and on
the low-precision inputs for torch's own rounding error).

Layout: q [B, T, Hq, D], k/v [B, S, Hkv, D]; Hq is a multiple of Hkv (GQA/MQA).
Causal with T != S aligns the last query with the last key (FlashAttention's convention):
query i sits at position i + S - T.
"""

from __future__ import annotations

import math

import torch


def visible(
    t: int,
    s: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    seq_lens: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which key each query may see: bool [B or 1, 1, T, S].

    causal: key j <= query position; window (left, right): position - left <= j <= position + right;
    seq_lens [B]: keys j >= seq_lens[b] are padding.
    """
    pos_q = torch.arange(t, device=device)[:, None] + (s - t)  # (T, 1)
    pos_k = torch.arange(s, device=device)[None, :]  # (1, S)
    mask = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        mask &= pos_k <= pos_q
    if window is not None:
        left, right = window
        mask &= (pos_k >= pos_q - left) & (pos_k <= pos_q + right)
    mask = mask[None, None]  # (1, 1, T, S)
    if seq_lens is not None:
        keys_valid = pos_k[None] < seq_lens.to(device).view(-1, 1, 1)  # (B, 1, S)
        mask = mask & keys_valid[:, None]  # (B, 1, T, S)
    return mask


def alibi_slopes(heads: int) -> torch.Tensor:
    """The standard geometric ALiBi slopes (Press et al.), float32 [heads]."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_two_slopes(heads)
    else:  # the paper's rule for other head counts: interleave the next power of two's slopes
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotate-half RoPE angles: float32 [T, D/2] for integer positions [T]."""
    inv_freq = theta ** (-torch.arange(0, head_dim // 2, dtype=torch.float64, device=positions.device) * 2 / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotation of x [B, T, H, D] by cos/sin [T, D/2] (any float dtype)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[None, :, None, :].to(x.dtype)
    s = sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope(x: torch.Tensor, theta: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """x [B, T, H, D] rotated by RoPE at positions offset .. offset+T-1 (rotate-half)."""
    positions = torch.arange(offset, offset + x.shape[1], device=x.device)
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    return rotate(x, cos, sin)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention by definition: o [B, T, Hq, D].

    slopes [Hq]: ALiBi bias -slope * |pos_q - pos_k| added to the scores.
    mask bool [B or 1, Hq or 1, T, S]: keys a query may see, ANDed with the options' pattern.
    A query that sees no key gets zeros (not NaN).
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    if slopes is not None:
        pos_q = torch.arange(t, device=q.device)[:, None] + (s - t)
        pos_k = torch.arange(s, device=q.device)[None, :]
        distance = (pos_q - pos_k).abs().to(scores.dtype)  # (T, S)
        scores = scores - slopes.to(scores.dtype).view(1, hq, 1, 1) * distance
    seen = visible(t, s, causal=causal, window=window, seq_lens=seq_lens, device=q.device)
    if mask is not None:
        seen = seen & mask.to(q.device)
    scores = scores.masked_fill(~seen, float("-inf"))
    upcast = torch.promote_types(scores.dtype, torch.float32)  # softmax in at least fp32, as kernels do
    probs = torch.softmax(scores.to(upcast), dim=-1).nan_to_num(0.0).to(q.dtype)  # all-masked rows -> 0
    return torch.einsum("bhts,bshd->bthd", probs, v)


def exposb_transform(
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    lam: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    base: float = 10000.0,
) -> torch.Tensor:
    """ExpoSB's q' (or k'): x [B, T, H, D] at integer positions [T] -> x' [B, T, H, D].

    Per head h (parameters are [H], the heads of x): RoPE rotation (rotate-half, angle of
    pair i is pos * base^(-2i/D)) scaled by 1 + alpha_h * exp(-pos * lam_h), then each
    channel j times beta_h + gamma_h * exp(-(j - mu_h)^2 / (2 sigma_h^2)).
    The factors are computed in at least float32 and applied in x's dtype (as `rotate` does).
    """
    d = x.shape[-1]
    work = torch.promote_types(torch.promote_types(x.dtype, lam.dtype), torch.float32)
    inv_freq = base ** (-torch.arange(0, d // 2, dtype=torch.float64, device=x.device) * 2 / d)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    pos = positions.to(work)[:, None]  # (T, 1)
    modulation = 1 + alpha.to(work) * torch.exp(-pos * lam.to(work))  # (T, H)
    channel = torch.arange(d, dtype=work, device=x.device)[:, None]  # (D, 1)
    band = torch.exp(-((channel - mu.to(work)) ** 2) / (2 * sigma.to(work) ** 2))  # (D, H)
    channel_filter = (beta.to(work) + gamma.to(work) * band).T  # (H, D)
    rotated = rotate(x, angles.cos().to(work), angles.sin().to(work))
    return rotated * modulation[None, :, :, None].to(x.dtype) * channel_filter[None, None].to(x.dtype)


def exposb_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lam: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    delta: torch.Tensor,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """ExpoSB attention by definition: o [B, T, Hq, D] (q [B, T, Hq, D], k/v [B, S, Hkv, D]).

    Parameters are per query head, each [Hq]: lam (> 0), alpha, beta, gamma, mu, sigma (> 0)
    feed `exposb_transform`; delta (>= 0) decays the scores multiplicatively:
    s_mn = (q'_m . k'_n) * exp(-|m - n| * delta_h) / sqrt(D), then masked softmax over n.
    GQA: k' for query head h is k of its kv head transformed with head h's parameters.
    Positions: keys 0 .. S-1, query i at i + S - T (the last query aligned with the last key).
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    params = dict(lam=lam, alpha=alpha, beta=beta, gamma=gamma, mu=mu, sigma=sigma)
    pos_q = torch.arange(s - t, s, device=q.device)
    pos_k = torch.arange(s, device=q.device)
    q = exposb_transform(q, pos_q, **params)
    k = exposb_transform(k.repeat_interleave(hq // hkv, dim=2), pos_k, **params)
    work = torch.promote_types(torch.promote_types(q.dtype, delta.dtype), torch.float32)
    distance = (pos_q[:, None] - pos_k[None, :]).abs().to(work)  # (T, S)
    decay = torch.exp(-delta.to(work).view(hq, 1, 1) * distance).to(q.dtype)  # (Hq, T, S)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay * d**-0.5  # (B, Hq, T, S)
    mask = visible(t, s, causal=causal, seq_lens=seq_lens, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    upcast = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores.to(upcast), dim=-1).nan_to_num(0.0).to(q.dtype)  # all-masked rows -> 0
    return torch.einsum("bhts,bshd->bthd", probs, v.repeat_interleave(hq // hkv, dim=2))
