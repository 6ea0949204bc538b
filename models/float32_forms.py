"""Forms that compute in float32 on purpose (states that sum over T, a triangular solve)
must not have autocast cast their matmuls back to bf16 while a model trains under it."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def outside_autocast(form: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``form(q, ...)`` with autocast off on q's device (the form does its own casting)."""

    @functools.wraps(form)
    def run(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            return form(q, *args, **kwargs)

    return run
