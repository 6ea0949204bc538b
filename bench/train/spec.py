"""What `attnbench train` is asked to do (TrainSpec): recorded in meta.json, compared on --resume,
its defaults filled in from the preset and validated by ``resolved()``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from attnbench.errors import InputError
from attnbench.models import registry
from attnbench.models.presets import Preset
from attnbench.train.impl_choice import check_mechanism_options, impl_per_mechanism


@dataclass
class TrainSpec:
    """What `attnbench train` was asked to do; recorded in meta.json, compared on --resume.
    None means the preset's default (models/presets.py)."""

    attn: list[str]
    task: str = "mlm"
    preset: str = "small"
    impl: str = "auto"
    steps: int = 2000
    seq: int | None = None
    batch: int | None = None
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.01
    clip: float = 1.0
    data: str = "stdlib"
    tokenizer: str = "bpe"
    download: bool = False
    device: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    positions: str = "learned"
    seed: int = 0
    gpus: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # mechanism options (window, theta, ...)

    def resolved(self) -> "TrainSpec":
        """The spec with the preset's defaults filled in, validated (InputError on bad values)."""
        preset = Preset.from_name(self.preset)
        spec = TrainSpec(**{f.name: getattr(self, f.name) for f in fields(self)})
        spec.seq = preset.seq if spec.seq is None else spec.seq  # None, not 0: 0 is refused below
        spec.batch = preset.batch if spec.batch is None else spec.batch
        spec.lr = preset.lr if spec.lr is None else spec.lr
        spec.warmup = preset.warmup if spec.warmup is None else spec.warmup
        if spec.task not in ("mlm", "clm"):
            raise InputError(f"--task {spec.task}: valid: mlm, clm")
        for name in ("steps", "seq", "batch", "eval_every", "eval_batches", "gpus"):
            if getattr(spec, name) <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive, not {getattr(spec, name)}")
        if spec.lr <= 0 or spec.clip <= 0:
            raise InputError("--lr and the gradient clip must be positive")
        check_mechanism_options(spec.attn, spec.extra)
        impl_per_mechanism(spec.impl, spec.attn)
        if spec.positions not in ("learned", "sinusoidal"):
            raise InputError(f"--positions {spec.positions}: valid: learned, sinusoidal")
        if spec.batch % spec.gpus:
            raise InputError(f"--batch {spec.batch} must be a multiple of --gpus {spec.gpus}")
        if not spec.attn or len(set(spec.attn)) != len(spec.attn):
            raise InputError("--attn needs one or more distinct mechanism names")
        for name in spec.attn:
            registry.get(name)
        return spec
