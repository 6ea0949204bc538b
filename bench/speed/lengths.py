"""`speed --lengths`: the sequence lengths of one packed variable-length batch.

The pack lays its N sequences end to end, FlashAttention's varlen layout: q [total, Hq, D],
k/v [total, Hkv, D] with no padding, and ``cu_seqlens`` int32 [N + 1] their offsets
(0, L1, L1 + L2, ..., total). Three forms, anything else an InputError:

    256 1024 4096   a list: the pack itself, these sequences in this order (its tokens are
                    their sum, so --tokens is refused beside it)
    uniform:LO-HI   lengths drawn uniformly from LO..HI (both included) with --seed until the
                    pack holds --tokens tokens
    file:PATH       lengths drawn with --seed (with replacement) from a text file's, one positive
                    integer a line (blank lines and # comments skipped), until --tokens: a
                    corpus' document lengths as the distribution

A drawn pack holds exactly --tokens tokens: its last sequence is cut to what remains, so it
may be shorter than LO (as a packing data loader cuts its last document).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from attnbench.errors import InputError

FORMS = "a list of lengths (256 1024 4096), uniform:LO-HI or file:PATH"


@dataclass(frozen=True)
class Lengths:
    """A parsed --lengths: ``text`` its canonical form (the rows' ``lengths`` column); ``listed``
    the pack of a list, or ``choices`` the lengths a drawn pack picks from."""

    text: str
    listed: tuple[int, ...] = ()
    choices: Sequence[int] = ()

    @property
    def drawn(self) -> bool:
        """Whether the pack is drawn until it holds --tokens (uniform:, file:), not listed."""
        return not self.listed

    def pack(self, tokens: int | None, seed: int) -> list[int]:
        """The pack's lengths: the list, or lengths drawn with ``seed`` until they hold ``tokens``
        (the last one cut to what remains)."""
        if self.listed:
            return list(self.listed)
        rng = random.Random(seed)
        lengths: list[int] = []
        held = 0
        while held < tokens:
            lengths.append(min(rng.choice(self.choices), tokens - held))  # a range picks in O(1)
            held += lengths[-1]
        return lengths


def parse(values: list[str]) -> Lengths:
    """The --lengths values (one form; the command line splits a list into its values)."""
    forms = [value for value in values if ":" in value]
    if forms and len(values) > 1:
        raise InputError(f"--lengths {' '.join(values)}: give one of {FORMS}, not several")
    if not forms:
        return Lengths(",".join(values), listed=tuple(_length(value, "--lengths") for value in values))
    kind, _, rest = forms[0].partition(":")
    if kind == "uniform":
        match = re.fullmatch(r"(\d+)-(\d+)", rest)
        low, high = (int(match[1]), int(match[2])) if match else (0, 0)
        if not match or not 1 <= low <= high:
            raise InputError(f"--lengths {forms[0]}: expected uniform:LO-HI with 1 <= LO <= HI, e.g. uniform:256-4096")
        return Lengths(forms[0], choices=range(low, high + 1))
    if kind == "file":
        return Lengths(forms[0], choices=_read(Path(rest)))
    raise InputError(f"--lengths {forms[0]}: unknown form '{kind}:'; give {FORMS}")


def _length(text: str, where: str) -> int:
    try:
        length = int(text)
    except ValueError:
        length = 0
    if length <= 0:
        raise InputError(f"{where}: a sequence length is a positive integer, got '{text}'")
    return length


def _read(path: Path) -> tuple[int, ...]:
    """A file's lengths: one a line, blank lines and # comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--lengths file:{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    lengths = tuple(_length(line.strip(), f"--lengths file:{path} line {number}")
                    for number, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#"))
    if not lengths:
        raise InputError(f"--lengths file:{path}: no lengths in it (one positive integer a line)")
    return lengths


def cu_seqlens(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The pack's offsets, int32 [N + 1]: 0, L1, L1 + L2, ..., total."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
