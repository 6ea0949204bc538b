"""The dtypes a case can compute in, by the short name the CSV and the command line use."""

from __future__ import annotations

import torch

from attnbench.errors import InputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def resolve_dtype(name: str) -> str:
    """The short name of ``name`` (an alias such as bfloat16 or half accepted); InputError if unknown."""
    canonical = DTYPE_ALIASES.get(name.lower(), name.lower())
    if canonical not in DTYPES:
        raise InputError(f"unknown dtype '{name}'; valid: {', '.join(DTYPES)}")
    return canonical
