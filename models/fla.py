"""flash-linear-attention (fla-core, the `peers` extra) as an optional peer: one check that
says why an fla impl cannot run here."""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable

NOT_INSTALLED = "fla-core is not installed (pip install 'attnbench[peers]')"  # quoted: zsh globs [...]


def fla_missing(ops: str) -> Callable[[], str | None]:
    """An Impl.missing for an fla impl that needs ``fla.ops.<ops>``: None when it imports."""

    @functools.cache
    def missing() -> str | None:
        try:
            with warnings.catch_warnings():  # fla warns at import on a machine without a GPU
                warnings.simplefilter("ignore")
                importlib.import_module(f"fla.ops.{ops}")
        except ImportError:
            return NOT_INSTALLED
        return None

    return missing
