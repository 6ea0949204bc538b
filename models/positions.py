"""Position schemes: an axis of their own, crossed with the attention mechanisms.

    learned     a learned table [max_seq, C] added to the token embeddings (BERT, GPT-2)
    sinusoidal  Vaswani et al.'s fixed table, added the same way
    rope        q and k rotated by their positions (rotate-half, base theta) before the core
    alibi       -slope_h * |pos_q - pos_k| added to the scores before their softmax
    none        nothing: the model sees order only through a causal mask, if it has one

learned and sinusoidal live in the model's embeddings (models/transformer.py); rope and alibi
in the attention layer (``LayerConfig.positions``): the softmax family fuses both into its
kernels (the ``theta`` and ``slopes`` kernel options), other cores get q and k rotated before
them (rope) or the slopes for the score matrices they build (alibi).

Each mechanism names its natural scheme (``Mechanism.position``: what it is built with when no
scheme is asked for; ``INSIDE`` for one that encodes positions itself, exposb and
stickbreaking) and the schemes it refuses, each with a one-line reason (``Mechanism.refuses``).
Queries sit at the last T of the S key positions (bottom-right aligned, as with a KV cache).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from attnbench.kernels import reference
from attnbench.models.errors import UnknownNameError


Scheme = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
SCHEMES: tuple[str, ...] = ("learned", "sinusoidal", "rope", "alibi", "none")
EMBEDDED = ("learned", "sinusoidal")  # added to the token embeddings by the model
IN_LAYER = ("rope", "alibi")  # applied by the attention layer (LayerConfig.positions)
INSIDE = "inside"  # the natural scheme of a mechanism that encodes positions itself
DEFAULT_THETA = 10000.0
# each scheme's own options (``--option KEY=VALUE``), with defaults and meanings
PARAMS: dict[str, dict[str, tuple[Any, str]]] = {
    "rope": {"theta": (DEFAULT_THETA, "RoPE base: angle of pair i is pos * theta^(-2i/D)")},
}


def check_scheme(scheme: str) -> None:
    """UnknownNameError (a user error) for a name that is not a position scheme."""
    if scheme not in SCHEMES and scheme != INSIDE:
        raise UnknownNameError(f"unknown position scheme '{scheme}'; valid: {', '.join(SCHEMES)}")


def why_not(mechanism: "Mechanism", scheme: str) -> str | None:
    """Why ``mechanism`` cannot take position scheme ``scheme`` (one line), or None when it can.
    Its natural scheme always works; ``INSIDE`` names the natural scheme of a mechanism whose
    positions are not embeddings (what runs record for rope, alibi, exposb, stickbreaking)."""
    check_scheme(scheme)
    if scheme == mechanism.position:
        return None
    if scheme == INSIDE:
        return None if mechanism.position not in EMBEDDED else f"{mechanism.name} encodes no positions itself"
    return mechanism.refuses.get(scheme)


def resolve(mechanism: "Mechanism", scheme: str | None) -> str:
    """The scheme a model of ``mechanism`` records for the requested ``scheme``: its natural one
    for None. A learned or sinusoidal request for a mechanism whose natural scheme is not an
    embedding also resolves to the natural one: runs before position schemes were an axis
    recorded the model's absolute embedding that way (``learned`` for rope: committed run
    folders, which distill reads as teachers). Callers building a grid ask `why_not` first,
    which refuses that cell."""
    if scheme is None or (scheme in EMBEDDED and mechanism.position not in EMBEDDED):
        return mechanism.position
    check_scheme(scheme)
    return scheme


def layer_scheme(scheme: str | None) -> str | None:
    """The part of a model's scheme that its attention layer applies (LayerConfig.positions)."""
    return scheme if scheme in IN_LAYER else None


def own_scheme_only(reason: str) -> dict[str, str]:
    """``Mechanism.refuses`` of a mechanism that takes no scheme but its own: every scheme, one reason."""
    return {scheme: reason for scheme in SCHEMES}


def standard_with(scheme: str) -> dict[str, str]:
    """``Mechanism.refuses`` of the mechanism named after ``scheme`` (rope, alibi): standard
    attention with that scheme, so the others are standard's."""
    return {
        other: f"{scheme} is standard attention with {scheme} positions; for {other} positions use standard"
        for other in SCHEMES if other != scheme
    }


def theta(cfg: "LayerConfig") -> float:
    """The RoPE base of ``cfg`` (its ``theta`` option, DEFAULT_THETA when unset)."""
    return float(cfg.options.get("theta", DEFAULT_THETA))


def alibi_option(cfg: "LayerConfig", natural: str | None = None) -> dict:
    """{"slopes": float32 [Hq]} when ``cfg``'s layer applies ALiBi (its own scheme, else
    ``natural``), else {}: the kernel option of every core that biases its scores."""
    return {"slopes": reference.alibi_slopes(cfg.heads)} if (cfg.positions or natural) == "alibi" else {}


def alibi_bias(slopes: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """-slopes [H] * |pos_q [T] - pos_k [S]| -> [H, T, S] in ``dtype``, added to scores before a softmax."""
    distance = (pos_q[:, None] - pos_k[None, :]).abs().to(dtype)  # (T, S)
    return -slopes.to(dtype)[:, None, None] * distance


def rotate_qk(q: torch.Tensor, k: torch.Tensor, theta: float, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [B, T, Hq, D] and k [B, S, Hkv, D]: keys at positions offset .. offset+S-1,
    queries at the last T of them (offset + S - T + i)."""
    q_offset = offset + k.shape[1] - q.shape[1]
    return reference.rope(q, theta, q_offset), reference.rope(k, theta, offset)
