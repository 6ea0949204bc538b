"""The speed case: one point of a sweep, the schema of speed.csv's case columns.

    Case             the dataclass; its fields, in order, are the columns
    CASE_COLUMNS     their names: what identifies a row (resume, compare, report)
    Case.from_row    a CSV row (strings) back into a Case
    option_text      a mechanism's options as the ``options`` cell
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass, fields
from typing import Any, get_type_hints

from attnbench.models import positions as schemes
from attnbench.models.registry import LayerConfig


@dataclass(frozen=True)
class Case:
    """One point of a speed sweep; its fields, in order, are speed.csv's case columns (CASE_COLUMNS)."""

    mechanism: str
    impl: str
    level: str
    mode: str
    dtype: str
    device: str
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    window: int | None
    preset: str = ""  # model level only: the models/presets.py shape (heads, head_dim follow it)
    positions: str = ""  # the position scheme (`speed --positions`; "": the mechanism's natural one)
    options: str = ""  # the mechanism's --option values it declares, as option_text writes them
    queries: int | None = None  # mode decode only: N new tokens per sequence a step (seq is then the context L)
    lengths: str = ""  # a packed batch only (`speed --lengths`): the distribution as asked, e.g. uniform:256-4096
    pack: str = ""  # a packed batch only: its sequences' lengths, comma-separated (batch: N of them, seq: the longest)

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "Case":
        """The case of a speed.csv row (strings as store.format_value wrote them; a column that an
        older schema lacks reads as empty)."""
        hints = get_type_hints(cls)
        return cls(**{f.name: _parse(row.get(f.name, ""), hints[f.name]) for f in fields(cls)})

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            dim=self.heads * self.head_dim, heads=self.heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, causal=self.causal, impl=self.impl, window=self.window,
            positions=schemes.layer_scheme(self.positions or None), options=self.option_values(),
        )

    def option_values(self) -> dict[str, Any]:
        """The ``options`` column back into values: 'compression=4; theta=500.0' -> {...}."""
        return {key: ast.literal_eval(value) for key, _, value in (item.partition("=") for item in self.options.split("; ") if item)}

    def seq_lengths(self) -> list[int]:
        """The packed batch's sequence lengths ([] for a case of B sequences of T tokens)."""
        return [int(length) for length in self.pack.split(",")] if self.pack else []

    def tokens(self) -> int:
        """Tokens one call processes: the pack's, B x N new ones (mode decode), or B x T."""
        if self.pack:
            return sum(self.seq_lengths())
        return self.batch * (self.queries if self.queries is not None else self.seq)

    def mean_length(self) -> float | None:
        """A packed batch's mean sequence length (None for the others)."""
        return self.tokens() / self.batch if self.pack else None

    def series(self) -> tuple:
        """Everything but the size: an OOM at one size skips the larger sizes of the same series."""
        return tuple(v for k, v in asdict(self).items() if k not in ("batch", "seq"))

    def larger_than(self, other: "Case") -> bool:
        """Same series, and no smaller in seq nor batch (what an OOM at ``other`` predicts for explicit batches)."""
        return self.series() == other.series() and self.seq >= other.seq and self.batch >= other.batch and self != other

    def longer_than(self, other: "Case") -> bool:
        """Same series and a longer sequence (a fixed token budget shrinks B as T grows, but
        attention's cost per token still grows with T, so a longer T is the larger size)."""
        return self.series() == other.series() and self.seq > other.seq


CASE_COLUMNS = [f.name for f in fields(Case)]
# speed.csv files of schema 2 lack positions and options, of schema 3 queries, of schema 4 lengths and pack (read as empty)
ADDED_COLUMNS = ("positions", "options", "queries", "lengths", "pack")


def option_text(options: dict[str, Any]) -> str:
    """Mechanism options as one CSV cell, keys sorted, values as Python literals: {'theta': 500.0} -> 'theta=500.0'."""
    return "; ".join(f"{key}={value!r}" for key, value in sorted(options.items()))


def _parse(text: str, hint: object) -> object:
    """A CSV cell back into the field's type: '' is None for an optional int, 'True' is True."""
    if hint == int | None:
        return int(text) if text else None
    return {int: int, bool: lambda value: value == "True", str: str}[hint](text)
