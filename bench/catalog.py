"""What `attnbench list` shows: every mechanism with its traits and which impls run here."""

from __future__ import annotations

from typing import Any

import torch

from attnbench.models.registry import Impl, mechanisms


def machine_reason(impl: Impl) -> str | None:
    """Why ``impl`` cannot run on this machine at all (package missing, no CUDA), or None."""
    reason = impl.missing()
    if reason:
        return reason
    if impl.needs_cuda and not torch.cuda.is_available():
        return "needs a CUDA device (none on this machine)"
    return None


def describe() -> list[dict[str, Any]]:
    """Per mechanism: name, description, family, position, supports, impls {name: reason | None}
    and params [(name, default, meaning)]: what --option KEY=VALUE can set."""
    entries = []
    for mechanism in mechanisms().values():
        supports = [name for name, ok in (("causal", mechanism.causal), ("bidirectional", mechanism.bidirectional),
                                          ("padding", mechanism.padding), ("GQA", mechanism.gqa)) if ok]
        if not mechanism.has_core:
            supports.append("layer level only")
        entries.append({
            "name": mechanism.name,
            "description": mechanism.description,
            "family": mechanism.family,
            "position": mechanism.position,
            "supports": supports,
            "params": [(name, default, meaning) for name, (default, meaning) in mechanism.params.items()],
            "impls": {name: machine_reason(impl) for name, impl in mechanism.impls.items()},
        })
    return entries


def availability(entries: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each reason an impl is unavailable here -> the impl names it applies to."""
    reasons: dict[str, list[str]] = {}
    for entry in entries:
        for name, reason in entry["impls"].items():
            if reason is not None and name not in reasons.setdefault(reason, []):
                reasons[reason].append(name)
    return reasons
