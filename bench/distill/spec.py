"""What one `attnbench distill` run does (DistillSpec, the CLI's options) and the students it
trains (StudentCell: a mechanism, the position scheme it is given, the weight of its mask penalty).

Students cross three lists: --student mechanisms x --positions schemes x --mask-l1 strengths,
the last only for mechanisms whose layers define ``sparsity_penalty()`` (the others train once,
without a penalty). A cell whose mechanism cannot take its scheme is not trained: the run records
it as a row of status unsupported with the reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from attnbench.errors import InputError
from attnbench.models import positions, registry
from attnbench.train.impl_choice import check_mechanism_options, impl_per_mechanism


MASK_LR, MASK_FREEZE = 1e-2, 0.5


@dataclass(frozen=True)
class StudentCell:
    """One student: ``mechanism`` given position scheme ``positions`` (None: the teacher's, or the
    mechanism's own) and trained with ``mask_l1`` x its sparsity penalty; ``name`` is how the run calls it."""

    name: str
    mechanism: str
    positions: str | None = None
    mask_l1: float = 0.0

    def why_not(self) -> str | None:
        """Why this mechanism cannot take this scheme (the cell's unsupported row), or None."""
        return None if self.positions is None else positions.why_not(registry.get(self.mechanism), self.positions)


@dataclass
class DistillSpec:
    """What one `attnbench distill` run does (the CLI's options)."""

    teacher: str
    students: list[str]
    teacher_attn: str | None = None  # which mechanism of a multi-mechanism train run; None: its first
    steps: int = 200
    lr: float = 2e-4  # the attention starts from the teacher's weights: a fine-tuning rate
    temperature: float = 1.0
    layer_mse: float = 0.0
    mask_l1: list[float] = field(default_factory=lambda: [0.0])  # one student per strength (penalised students)
    mask_lr: float = MASK_LR  # the learned masks' scorers: gates must cross from open to shut within the run
    mask_freeze: float = MASK_FREEZE  # the fraction of the steps after which the masks stop learning
    train_all: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    impl: str = "auto"
    batch: int | None = None  # None: the teacher's training batch
    seq: int | None = None  # None: the teacher's training length
    new_tokens: int = 40
    seed: int = 0
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # the students' mechanism options (window, topn, ...)
    data: str | None = None  # the corpus distilled on (train's --data names; None: the teacher run's, or stdlib)
    positions: list[str] | None = None  # the students' position schemes (None: the teacher's, or the student's own)
    kv_heads: int | None = None  # the students' key/value heads (GQA/MQA; None: the teacher's)
    download: bool = False  # may a transformers teacher (or a train run's corpus) be fetched
    prompts: str | None = None  # a prompts file for the generations (None: bench/distill/generate.py's PROMPTS)
    scale_seq: list[int] | None = None  # lengths one attention layer of each model is timed at (None: by device)

    def __post_init__(self) -> None:
        if not isinstance(self.mask_l1, list):  # meta.json of runs before strengths were a list
            self.mask_l1 = [float(self.mask_l1)]
        if isinstance(self.positions, str):
            self.positions = [self.positions]

    def cells(self) -> list[StudentCell]:
        """Every student of the run, in order: mechanism, then scheme, then strength."""
        schemes = self.positions or [None]
        several = len(self.mask_l1) > 1
        cells = []
        for mechanism in self.students:
            penalised = has_sparsity_penalty(mechanism)
            for scheme in schemes:
                for weight in self.mask_l1 if penalised else [0.0]:
                    name = mechanism + (f"+{scheme}" if scheme is not None else "") + (f"@l1={weight:g}" if several and penalised else "")
                    cells.append(StudentCell(name, mechanism, scheme, weight))
        return cells

    def validate(self) -> None:
        if not self.students:
            raise InputError("give at least one --student mechanism")
        if len(set(self.students)) != len(self.students):
            raise InputError(f"--student {','.join(self.students)}: each mechanism once (a student per name)")
        for name in self.students:
            registry.get(name)  # unknown: UnknownNameError with the valid names
        check_mechanism_options(self.students, self.options)
        impl_per_mechanism(self.impl, self.students)
        sizes = (("steps", self.steps), ("eval-every", self.eval_every), ("eval-batches", self.eval_batches),
                 ("batch", self.batch), ("seq", self.seq), *(("scale-seq", s) for s in self.scale_seq or []))
        for option, value in sizes:
            if value is not None and value <= 0:
                raise InputError(f"--{option} must be positive, not {value}")
        if self.lr <= 0 or self.mask_lr <= 0 or self.temperature <= 0:
            raise InputError("--lr, --mask-lr and --temperature must be positive")
        if not 0 < self.mask_freeze <= 1:
            raise InputError(f"--mask-freeze is a fraction of the steps in (0, 1], not {self.mask_freeze}")
        for scheme in self.positions or []:
            positions.check_scheme(scheme)
        if self.positions and len(set(self.positions)) != len(self.positions):
            raise InputError(f"--positions {','.join(self.positions)}: each scheme once")
        if self.kv_heads is not None and self.kv_heads <= 0:
            raise InputError(f"--kv-heads must be positive, not {self.kv_heads}")
        if self.layer_mse < 0 or any(w < 0 for w in self.mask_l1) or not self.mask_l1:
            raise InputError("--layer-mse and --mask-l1 are weights: 0 or more")
        if len(set(self.mask_l1)) != len(self.mask_l1):
            raise InputError(f"--mask-l1 {','.join(f'{w:g}' for w in self.mask_l1)}: each strength once")
        if any(self.mask_l1) and not any(has_sparsity_penalty(name) for name in self.students):
            takers = ", ".join(name for name in registry.mechanisms() if has_sparsity_penalty(name))
            raise InputError(f"--mask-l1 weighs a student's sparsity penalty, and {', '.join(self.students)} define none (students that do: {takers})")
        if (self.mask_lr, self.mask_freeze) != (MASK_LR, MASK_FREEZE) and not any(has_sparsity_penalty(n) for n in self.students):
            raise InputError(f"--mask-lr and --mask-freeze train a student's learned mask, and {', '.join(self.students)} have none")
        if all(cell.why_not() for cell in self.cells()):
            reasons = "; ".join(f"{cell.name}: {cell.why_not()}" for cell in self.cells())
            raise InputError(f"no student can be trained: {reasons}")


@functools.cache  # builds a layer; cells() and validate() ask once per student and cell
def has_sparsity_penalty(mechanism: str) -> bool:
    """Whether ``mechanism``'s layer defines ``sparsity_penalty()`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        layer = registry.build_layer(mechanism, registry.LayerConfig(dim=64, heads=4, causal=registry.get(mechanism).causal))
    return any(callable(getattr(m, "sparsity_penalty", None)) for m in layer.modules())
