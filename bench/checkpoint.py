"""Checkpoints of train and distill: every tensor in safetensors, everything else in JSON; loading
runs no pickle (no torch.load).

    <folder>/step-000100/model.safetensors       the model's weights (tied tensors stored once), or with
                                                 trainable_only its trainable parameters and its buffers
    <folder>/step-000100/optimizer.safetensors   optimizer state tensors as "state.<param index>.<key>",
                                                 the CPU RNG state as "rng"
    <folder>/step-000100/optimizer.json          optimizer param_groups, its non-tensor state entries
                                                 ({"<param index>": {key: value}}), scheduler.state_dict()
    <folder>/step-000100/state.json              step, anything else the trainer keeps (read_state)
    <folder>/latest.json                         {"step_dir": "step-000100"}: the last complete checkpoint

Every file is written to a temp name and renamed; latest.json moves only after a whole step
folder exists, so a run killed at any moment resumes from a complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from attnbench import store
from attnbench.errors import InputError

LATEST = "latest.json"
MODEL, OPTIMIZER_TENSORS, OPTIMIZER_JSON, STATE = "model.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
         scheduler: Any = None, trainable_only: bool = False) -> Path:
    """Write a checkpoint of ``state["step"]`` and point latest.json at it; older ones are removed.

    ``trainable_only``: keep only the parameters that train and every buffer; the frozen ones come
    from elsewhere when loading (distill: the teacher).
    """
    folder.mkdir(parents=True, exist_ok=True)
    step_dir = folder / f"step-{int(state['step']):06d}"
    step_dir.mkdir(exist_ok=True)
    with store.replacing(step_dir / MODEL) as tmp:
        if trainable_only:
            save_file({name: t.detach().contiguous() for name, t in _trainable(model).items()}, str(tmp))
        else:
            save_model(model, str(tmp))
    tensors, rest = _split_optimizer(optimizer.state_dict())
    with store.replacing(step_dir / OPTIMIZER_TENSORS) as tmp:
        save_file({**tensors, "rng": torch.get_rng_state()}, str(tmp))
    store.write_json(step_dir / OPTIMIZER_JSON, {**rest, "scheduler": scheduler.state_dict() if scheduler is not None else None})
    store.write_json(step_dir / STATE, state)
    store.write_json(folder / LATEST, {"step_dir": step_dir.name})
    for old in folder.glob("step-*"):
        if old != step_dir:
            shutil.rmtree(old, ignore_errors=True)
    return step_dir


def latest(folder: Path) -> Path | None:
    """The last complete checkpoint folder under ``folder``, or None."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    try:
        step_dir = folder / json.loads(pointer.read_text())["step_dir"]
    except (ValueError, KeyError) as err:
        raise InputError(f"{pointer} is corrupt: {err}") from None
    return step_dir if step_dir.is_dir() else None


def read_state(step_dir: Path) -> dict[str, Any]:
    return _read_json(step_dir / STATE)


def load(step_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         scheduler: Any = None, trainable_only: bool = False) -> dict[str, Any]:
    """Load weights (and optimizer, scheduler and RNG state) from ``step_dir`` into ``model``; returns its
    state. ``trainable_only``: the checkpoint was saved so; the model's frozen parameters stay as they are.

    A checkpoint of another model (other shapes or parameter names) is an InputError.
    """
    state = read_state(step_dir)
    device = str(next(model.parameters()).device)
    try:
        if trainable_only:
            _load_trainable(step_dir / MODEL, model)
        else:
            load_model(model, str(step_dir / MODEL), strict=True, device=device)
    except (RuntimeError, OSError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"checkpoint {step_dir} does not fit this model (another preset or mechanism?): {first}") from None
    if optimizer is not None:
        saved = _read_json(step_dir / OPTIMIZER_JSON)
        try:
            tensors = load_file(str(step_dir / OPTIMIZER_TENSORS))
        except (OSError, SafetensorError) as err:
            raise InputError(f"checkpoint {step_dir} is unreadable: {err}") from None
        try:
            torch.set_rng_state(tensors.pop("rng"))
            optimizer.load_state_dict(_join_optimizer(tensors, saved))
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise InputError(f"checkpoint {step_dir} does not fit this optimizer: {first}") from None
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"checkpoint {path.parent} is unreadable: {err}") from None


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a trainable_only checkpoint keeps: the parameters that train and the persistent buffers
    (tied tensors once: named_parameters gives each once)."""
    kept = model.state_dict().keys()
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update({name: b for name, b in model.named_buffers() if name in kept})
    return tensors


def _load_trainable(path: Path, model: torch.nn.Module) -> None:
    saved = load_file(str(path))
    expected = _trainable(model)
    if saved.keys() != expected.keys():
        other = sorted(saved.keys() ^ expected.keys())
        raise RuntimeError(f"tensors {', '.join(other[:3])}{', ...' if len(other) > 3 else ''} are in one of the checkpoint and the model only")
    model.load_state_dict(saved, strict=False)  # size mismatches raise RuntimeError


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict as safetensors tensors ("state.<param index>.<key>") and the JSON rest."""
    tensors, entries = {}, {}
    for index, per_param in state_dict["state"].items():
        entries[str(index)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                entries[str(index)][key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": entries}


def _join_optimizer(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    """The state_dict that _split_optimizer split."""
    state: dict[int, dict[str, Any]] = {int(index): dict(entries) for index, entries in saved["state"].items()}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": saved["param_groups"]}
