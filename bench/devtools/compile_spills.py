"""Registers and spills of ExpoSB's attention kernels for Hopper, compiled on any machine (no GPU).

    python3 -m attnbench.devtools.compile_spills [--head-dim 64 128] [--kernel fwd dq] [--loads pointer]

Compiles the forward, dq and dk/dv kernels (kernels/exposb_fwd.py, exposb_bwd.py) for sm_90a with
the tiles exposb_launch gives a bf16 launch on a GPU, causal and bidirectional, then reads each
cubin's registers per thread and spill bytes from `ptxas -v` (triton's bundled ptxas; the
CompiledKernel's n_regs / n_spills are only filled in when it is loaded onto a GPU). Arguments are
typed as a real launch specialises them: pointers and row strides 16-divisible, unit strides
constant, O in float32 (the forward of a training step keeps it so). Use the triton the GPU
machine runs (its codegen is what counts): a compile is a guide to register pressure, not a timing.
"""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import tempfile
from pathlib import Path
import torch

KERNELS = ("fwd", "dq", "dkdv")
# pointer arguments by name; every other upper-case argument points to float32
_POINTER_TYPES = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "QT": "*bf16", "KT": "*bf16", "DO": "*bf16",
    "DQ": "*bf16", "DK": "*bf16", "DV": "*bf16", "O": "*fp32", "SEQ_LENS": "*i32",
}
_SIZES = ("H", "GROUP", "T", "S")  # upper-case int32 arguments
_SCALARS = {"sm_scale": "fp32"}


def constexpr_names(fn) -> list[str]:
    """The arguments of the @triton.jit ``fn`` annotated tl.constexpr (jitted or interpreted)."""
    return [name for name, param in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(param.annotation)]


def _signature(fn, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton's ASTSource: what a launch with contiguous bf16
    tensors specialises to (unit strides become the constant 1, pointers and other strides
    16-divisible; stride_param and the sizes are not assumed divisible). ``constexprs``: a value
    for each of fn's tl.constexpr arguments."""
    missing = [name for name in constexpr_names(fn) if name not in constexprs]
    if missing:
        raise ValueError(f"{fn.fn.__name__} needs values for its constexpr arguments {', '.join(missing)}")
    signature, constants, divisible = {}, {}, []
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], constants[name] = "constexpr", constexprs[name]
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name], constants[name] = "constexpr", 1
        elif name[0].isupper() and name not in _SIZES:
            signature[name] = _POINTER_TYPES.get(name, "*fp32")
            divisible.append(index)
        else:
            signature[name] = _SCALARS.get(name, "i32")
            if name.startswith("stride_") and name != "stride_param":
                divisible.append(index)
    return signature, constants, {(index,): [["tt.divisibility", 16]] for index in divisible}


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the kernel in ``ptx``, from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run(
            [get_ptxas(90).path, "-v", "-arch=sm_90a", str(source), "-o", str(Path(folder) / "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    stores, loads = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report).groups())
    return registers, stores, loads


def compile_usage(kernel: str, head_dim: int, causal: bool, tma: bool) -> dict:
    """Compile one ExpoSB kernel for sm_90a at its GPU tile; its tile, registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attnbench.kernels import exposb_bwd, exposb_fwd, exposb_launch

    fn = {"fwd": exposb_fwd.exposb_fwd_kernel, "dq": exposb_bwd.exposb_dq_kernel, "dkdv": exposb_bwd.exposb_dkdv_kernel}[kernel]
    block_m, block_n, launch = exposb_launch.kernel_tiles(torch.device("cuda"), head_dim, kernel, torch.bfloat16, causal)
    wanted = dict(HAS_LENS=False, CAUSAL=causal, D=head_dim, GROUP=1, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION="tf32", TMA=tma, STORE_QT=True)
    signature, constants, attrs = _signature(fn, {name: value for name, value in wanted.items() if name in fn.arg_names})
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32), options=launch)
    registers, stores, loads = _ptxas_usage(compiled.asm["ptx"])
    tile = f"{block_m}x{block_n} w{launch['num_warps']} s{launch['num_stages']}"
    return {"kernel": kernel, "D": head_dim, "causal": causal, "tile": tile, "registers": registers, "spill_stores": stores, "spill_loads": loads}


def main() -> None:
    # argparse, not typer: the compile venv for the GPU's triton need hold no more than torch and triton
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--loads", choices=("tma", "pointer"), default="tma", help="how the loops read tiles, where a kernel has the choice")
    args = parser.parse_args()
    print(f"{'kernel':6s} {'D':>4s} {'mask':13s} {'tile':14s} {'regs':>4s} {'spill st/ld (B)':>16s}")
    for name in args.kernel:
        for d in args.head_dim:
            for causal in (True, False):
                row = compile_usage(name, d, causal, args.loads == "tma")
                mask = "causal" if causal else "bidirectional"
                spills = f"{row['spill_stores']} / {row['spill_loads']}"
                print(f"{name:6s} {d:4d} {mask:13s} {row['tile']:14s} {row['registers']:4d} {spills:>16s}", flush=True)


if __name__ == "__main__":
    main()
