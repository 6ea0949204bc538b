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
) -> torch.Tensor:
    """Softmax attention by definition: o [B, T, Hq, D].

    slopes [Hq]: ALiBi bias -slope * |pos_q - pos_k| added to the scores.
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
    mask = visible(t, s, causal=causal, window=window, seq_lens=seq_lens, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    upcast = torch.promote_types(scores.dtype, torch.float32)  # softmax in at least fp32, as kernels do
    probs = torch.softmax(scores.to(upcast), dim=-1).nan_to_num(0.0).to(q.dtype)  # all-masked rows -> 0
    return torch.einsum("bhts,bshd->bthd", probs, v)
