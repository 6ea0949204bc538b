"""Config files: `--config FILE.toml` for `speed`, `train` and `distill`, and the config.toml
each run folder keeps so that `attnbench <command> --config <run>/config.toml` repeats it.

A file holds one `key = value` per option; keys are the long option names (`eval-every`, or
`eval_every`), values TOML scalars or lists (a list option also takes "a,b"). Options given on
the command line override the file; an unknown key is an InputError naming the valid ones.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from attnbench import store
from attnbench.errors import InputError

CONFIG_TOML = "config.toml"
PER_INVOCATION = ("config", "out", "resume")  # how this call runs, not what the run is: never in a config


def read(path: Path, options: dict[str, bool]) -> dict[str, Any]:
    """The file's values by parameter name, for click's default_map. ``options``: the command's
    parameter names (underscored), True for list options."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"--config {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--config {path}: not TOML: {err}") from None
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in options or name in PER_INVOCATION:
            valid = ", ".join(n.replace("_", "-") for n in options if n not in PER_INVOCATION)
            raise InputError(f"--config {path}: unknown key '{key}'; valid: {valid}")
        if options[name]:  # a list option: a list, or one "a,b" string
            items = value if isinstance(value, list) else [value]
            value = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
        values[name] = value
    return values


def of_invocation(params: dict[str, Any]) -> dict[str, Any]:
    """A command's parsed parameters as a config file holds them: long option names, without
    the per-invocation ones and the unset (None or empty) ones."""
    return {name.replace("_", "-"): value for name, value in params.items()
            if name not in PER_INVOCATION and value is not None and value not in ([], ())}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def keep(run_dir: Path, meta: dict[str, Any], options: dict[str, Any] | None) -> None:
    """A new run's options (of_invocation) as meta["config"] and <run_dir>/config.toml, written
    whole (store.replacing); nothing when the run was not started from the command line (None)."""
    if options is None:
        return
    meta["config"] = options
    with store.replacing(run_dir / CONFIG_TOML) as tmp:
        tmp.write_text("".join(f"{key} = {_toml_value(value)}\n" for key, value in options.items()), encoding="utf-8")
