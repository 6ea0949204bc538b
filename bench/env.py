"""The environment a result was measured in: GPU (pynvml), versions, git state, measured peaks.

Every results folder stores ``collect()`` in meta.json; `attnbench env` prints it.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import attnbench


def collect() -> dict[str, Any]:
    """Versions, git sha (+dirty), host and, when there is a CUDA device, what pynvml reports."""
    info: dict[str, Any] = {
        "attnbench": attnbench.__version__,
        "git": git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpus": gpus() if torch.cuda.is_available() else [],
    }
    return info


def timing_setup(info: dict[str, Any]) -> str:
    """What decides a timing in ``collect()``'s output: GPU models, torch, triton (one line)."""
    devices = ", ".join(gpu["name"] for gpu in info.get("gpus", [])) or "no GPU"
    return f"{devices}; torch {info.get('torch')}, triton {info.get('triton')}"


def _version_of(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> str | None:
    """'<sha>' or '<sha>+dirty' of the checkout attnbench runs from; None outside git."""
    root = Path(attnbench.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        sha = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def gpus() -> list[dict[str, Any]]:
    """Per CUDA device: name, memory, driver, SM/memory clocks (now and max), power limit and draw."""
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({
            "index": index,
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            **_nvml(index),
        })
    return found


def _nvml(index: int) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return {"nvml": f"NVML unavailable: {err}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        readings = {
            "driver": lambda: pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
            "power_draw_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        out: dict[str, Any] = {}
        for key, read in readings.items():
            try:
                value = read()
                out[key] = value.decode() if isinstance(value, bytes) else value
            except pynvml.NVMLError:  # a reading this GPU or driver does not offer
                out[key] = None
        return out
    finally:
        pynvml.nvmlShutdown()


def measure_peaks(device: str, dtypes: list[str]) -> dict[str, Any]:
    """Measured, not datasheet: matmul TFLOP/s per dtype (8192^3 on CUDA, 2048^3 on CPU) and
    device copy GB/s (read + write of a 1 GiB buffer on CUDA, 256 MiB on CPU)."""
    from attnbench import timing
    from attnbench.dtypes import DTYPES

    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 2048
    matmul = {}
    for name in dtypes:
        a = torch.randn(n, n, device=dev, dtype=DTYPES[name])
        b = torch.randn(n, n, device=dev, dtype=DTYPES[name])
        ms = timing.measure(lambda: a @ b, dev).median_ms
        matmul[name] = 2 * n**3 / (ms * 1e-3) / 1e12
        del a, b
    nbytes = 2**30 if dev.type == "cuda" else 2**28
    src = torch.empty(nbytes, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = timing.measure(lambda: dst.copy_(src), dev).median_ms
    return {"matmul_tflops": matmul, "copy_gbps": 2 * nbytes / (ms * 1e-3) / 1e9, "device": str(dev)}
