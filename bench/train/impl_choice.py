"""Which impl and options each mechanism of a `train` or `distill` run gets: the --window /
--option checks, --impl's per-mechanism entries, and the impl choice for the training device."""

from __future__ import annotations

from typing import Any

import torch

from attnbench.errors import InputError
from attnbench.models import registry


def check_mechanism_options(mechanisms: list[str], given: dict[str, Any], schemes: tuple[str, ...] = ()) -> None:
    """--window / --option values (cli.mechanism_options): each declared by one of ``mechanisms``
    or of the position ``schemes``, and a window a positive integer."""
    window = given.get("window")
    if window is not None and (not isinstance(window, int) or window <= 0):
        raise InputError(f"--window must be a positive integer, not {window!r}")
    registry.check_options(mechanisms, given, schemes)


def impl_per_mechanism(text: str, mechanisms: list[str]) -> dict[str, str]:
    """--impl: one impl (or auto) for every mechanism, and/or MECHANISM=IMPL entries for some,
    comma-separated: "auto,nsa=torch" -> {"performer": "auto", ..., "nsa": "torch"}. An entry
    for a mechanism not in ``mechanisms``, or two defaults, is an InputError."""
    default, chosen = None, {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, impl = entry.partition("=")
        if not sep:
            if default is not None:
                raise InputError(f"--impl {text}: one impl for every mechanism, then MECHANISM=IMPL entries")
            default = entry
        elif name.strip() not in mechanisms:
            raise InputError(f"--impl {entry}: {name.strip()} is not one of the mechanisms ({', '.join(mechanisms)})")
        else:
            chosen[name.strip()] = impl.strip()
    return {name: chosen.get(name, default or "auto") for name in mechanisms}


def choose_impl(mechanism: str, requested: str, layer: registry.LayerConfig, device: torch.device | str) -> str:
    """``requested`` if it can run ``layer`` on ``device`` in its training dtype (bf16 on CUDA,
    else fp32; InputError saying why not), or for "auto" the registry's preferred impl
    (Mechanism.preferred_impl). `train` and `distill` both choose through this."""
    entry = registry.get(mechanism)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    reason = entry.why_not(layer)
    if reason:
        raise InputError(f"{mechanism}: {reason}")
    if requested != "auto":
        why = entry.impl(requested).why_not(layer, device, dtype)
        if why:
            raise InputError(f"{mechanism}/{requested}: {why}")
        return requested
    chosen = entry.preferred_impl(layer, device, dtype)  # layer-only impls (gau) train too
    if chosen:
        return chosen
    raise InputError(f"{mechanism}: no impl can run on {device}")
