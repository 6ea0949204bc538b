"""Training checkpoints: safetensors weights, optimizer state, a small JSON of where the run is.

    <folder>/step-000100/model.safetensors   weights (tied tensors stored once)
    <folder>/step-000100/optimizer.pt        optimizer state + RNG state (torch.save; loaded weights_only)
    <folder>/step-000100/state.json          step, model config, anything else the trainer keeps
    <folder>/latest.json                     {"step_dir": "step-000100"}: the last complete checkpoint

Every file is written to a temp name and renamed; latest.json moves only after a whole step
folder exists, so a run killed at any moment resumes from a complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from attnbench import store
from attnbench.errors import InputError

LATEST = "latest.json"


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    """Write a checkpoint of ``state["step"]`` and point latest.json at it; older ones are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    step_dir = folder / f"step-{int(state['step']):06d}"
    step_dir.mkdir(exist_ok=True)
    with store.replacing(step_dir / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    with store.replacing(step_dir / "optimizer.pt") as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp)
    store.write_json(step_dir / "state.json", state)
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
    try:
        return json.loads((step_dir / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"checkpoint {step_dir} is unreadable: {err}") from None


def load(step_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer and RNG state) from ``step_dir`` into ``model``; returns its state.

    A checkpoint of another model (other shapes or parameter names) is an InputError.
    """
    state = read_state(step_dir)
    try:
        load_model(model, str(step_dir / "model.safetensors"), strict=True, device=str(next(model.parameters()).device))
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"checkpoint {step_dir} does not fit this model (another preset or mechanism?): {first}") from None
    if optimizer is not None:
        saved = torch.load(step_dir / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
    return state
