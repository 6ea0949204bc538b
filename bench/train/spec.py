"""What `attnbench train` is asked to do (TrainSpec): recorded in meta.json, compared on --resume,
its defaults filled in (the preset's, the device's, sized to the corpus) and validated by ``resolved()``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from attnbench.errors import InputError
from attnbench.models import positions, registry
from attnbench.models.presets import Preset
from attnbench.train.impl_choice import check_mechanism_options, impl_per_mechanism

DEVICE_PRESET = {"cpu": "tiny", "cuda": "small"}  # the default --preset on each device type
DEFAULT_EPOCHS = 2.0  # a default-sized run passes over the train split at most this often
MIN_DEFAULT_STEPS = 1000  # below this many steps, default sizing halves the batch instead
MAX_DEFAULT_STEPS = {"cpu": 2500, "cuda": 2000}  # cpu: the tiny preset in about 2 minutes on 2 cores


@dataclass
class TrainSpec:
    """What `attnbench train` was asked to do; recorded in meta.json, compared on --resume.

    None means a default: the preset's (models/presets.py) for seq, lr; the device's for preset
    (DEVICE_PRESET); steps, batch and warmup sized to the corpus by `default_size`.
    """

    attn: list[str]
    task: str = "mlm"
    preset: str | None = None
    impl: str = "auto"
    steps: int | None = None
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
    positions: list[str] | None = None  # position schemes crossed with attn (None: each mechanism's natural one)
    kv_heads: int | None = None  # GQA/MQA: key/value heads (None: as many as query heads)
    target_loss: float | None = None  # the report's steps to convergence count to it (None: the worst final eval loss)
    seed: int = 0
    gpus: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # mechanism options (window, theta, ...)

    def resolved(self, device: torch.device, train_tokens: int | None = None) -> "TrainSpec":
        """The spec with its defaults filled in for ``device``, validated (InputError on bad
        values). Steps, batch and warmup are sized only once ``train_tokens`` (the corpus's
        train split) is known; before that they stay None where not given."""
        spec = TrainSpec(**{f.name: getattr(self, f.name) for f in fields(self)})
        spec.preset = spec.preset or DEVICE_PRESET.get(device.type, "tiny")
        preset = Preset.from_name(spec.preset)
        spec.seq = preset.seq if spec.seq is None else spec.seq  # None, not 0: 0 is refused below
        spec.lr = preset.lr if spec.lr is None else spec.lr
        if train_tokens is not None:
            spec.steps, spec.batch = default_size(spec, preset, train_tokens, device)
            if spec.warmup is None:  # a warmup longer than a tenth of a default-sized run would be most of it
                spec.warmup = preset.warmup if self.steps is not None else min(preset.warmup, max(1, spec.steps // 10))
        if spec.task not in ("mlm", "clm"):
            raise InputError(f"--task {spec.task}: valid: mlm, clm")
        for name in ("steps", "seq", "batch", "warmup", "eval_every", "eval_batches", "gpus", "kv_heads"):
            value = getattr(spec, name)
            if value is not None and (value <= 0 if name != "warmup" else value < 0):
                raise InputError(f"--{name.replace('_', '-')} must be positive, not {value}")
        if spec.lr <= 0 or spec.clip <= 0:
            raise InputError("--lr and the gradient clip must be positive")
        if spec.positions is not None:
            if not spec.positions or len(set(spec.positions)) != len(spec.positions):
                raise InputError("--positions needs one or more distinct position schemes")
            for scheme in spec.positions:
                positions.check_scheme(scheme)
        check_mechanism_options(spec.attn, spec.extra, tuple(spec.positions or ()))
        impl_per_mechanism(spec.impl, spec.attn)
        if spec.batch is not None and spec.batch % spec.gpus:
            raise InputError(f"--batch {spec.batch} must be a multiple of --gpus {spec.gpus}")
        if not spec.attn or len(set(spec.attn)) != len(spec.attn):
            raise InputError("--attn needs one or more distinct mechanism names")
        for name in spec.attn:
            registry.get(name)
        return spec

    def cells(self) -> list["Cell"]:
        """The models of the run: every mechanism crossed with every position scheme, in order."""
        return [Cell(attn, scheme) for attn in self.attn for scheme in (self.positions or [None])]


@dataclass(frozen=True)
class Cell:
    """One model of a run: mechanism ``attn`` with position scheme ``positions`` (None: its natural one)."""

    attn: str
    positions: str | None = None

    @property
    def name(self) -> str:
        """How the run names it (progress, checkpoints/<name>/, meta.json's models): the mechanism,
        + the scheme when the run crosses schemes (``linear+rope``)."""
        return self.attn if self.positions is None else f"{self.attn}+{self.positions}"

    @property
    def scheme(self) -> str:
        """The scheme the model is built with and its rows record (models/positions.py resolve)."""
        return positions.resolve(registry.get(self.attn), self.positions)

    def why_not(self) -> str | None:
        """Why this mechanism cannot take this scheme (a row of status unsupported), or None."""
        return None if self.positions is None else positions.why_not(registry.get(self.attn), self.positions)


def default_size(spec: TrainSpec, preset: Preset, train_tokens: int, device: torch.device) -> tuple[int, int]:
    """(steps, batch) where not given: at most DEFAULT_EPOCHS passes over ``train_tokens`` and
    MAX_DEFAULT_STEPS[device type]; when the preset's batch leaves fewer than MIN_DEFAULT_STEPS
    steps, the batch halves (staying a multiple of --gpus) so that the run takes more, smaller steps."""
    budget = int(DEFAULT_EPOCHS * train_tokens)  # tokens a default run may read
    max_steps = MAX_DEFAULT_STEPS.get(device.type, MAX_DEFAULT_STEPS["cpu"])
    batch = spec.batch
    if batch is None:
        batch = preset.batch
        while spec.steps is None and budget // (batch * spec.seq) < min(max_steps, MIN_DEFAULT_STEPS) \
                and batch // 2 >= spec.gpus and (batch // 2) % spec.gpus == 0:
            batch //= 2
    steps = spec.steps if spec.steps is not None else max(1, min(max_steps, budget // (batch * spec.seq)))
    return steps, batch
