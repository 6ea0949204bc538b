"""The Hopper forward's plans (kernels/flash_fwd_hopper.py) compiled for sm_90a on any machine (no GPU):
registers and spills (ptxas -v) and what one key tile costs a consumer warp (nvdisasm).

    python3 -m attnbench.devtools.hopper_sass [--head-dim 64 128]

For each plan in flash_fwd_hopper.PLANS, a bf16 launch's kernel is compiled with triton's own tools; its
consumers' tile loop is the shortest loop of the SASS that issues wgmma (HGMMA) and a tile's exponentials
(MUFU, 64 x BLOCK_N / 128 a thread): its instructions, MUFU and HGMMA among them, and those inside its largest forward branch (the
masking, which only diagonal and edge tiles take), so an unmasked tile issues the rest. Use the triton the GPU
machine runs (its codegen is what counts); these are static counts, a guide to issue and unit pressure, not a
timing (PERF_NOTES 23 reads them against the SM's units).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from attnbench.devtools.compile_spills import _ptxas_usage
from attnbench.kernels import flash_dkdv_hopper, flash_fwd_hopper
from attnbench.kernels.flash import flash_problem


def _compile(kernel, args: tuple, constexprs: dict, options: dict):
    """The CompiledKernel a launch of the Gluon ``kernel`` with these arguments specialises to, built for sm_90a here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile, make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    keywords = {**constexprs, **options}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, parsed = binder(*args, **keywords)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, keywords, bound, specialization, parsed)
    return compile(GluonASTSource(kernel, signature, constexprs, attrs), target=target, options=parsed.__dict__)


def compile_plan(head_dim: int, causal: bool, plan: flash_fwd_hopper.HopperPlan, seq: int = 1024, heads: int = 4):
    """The CompiledKernel a bf16 launch of ``plan`` (B 2, T = S = seq) specialises to, built for sm_90a here."""
    q = torch.zeros(2, seq, heads, head_dim, dtype=torch.bfloat16)
    args, constexprs, options = flash_fwd_hopper.launch_arguments(q, q, q, torch.zeros_like(q), torch.zeros(2, heads, seq), 0.18, causal, plan)
    return _compile(flash_fwd_hopper.flash_fwd_hopper_kernel, args, constexprs, options)


def compile_dkdv(head_dim: int, causal: bool, tile: flash_dkdv_hopper.DkdvTile, seq: int = 1024, heads: int = 4):
    """The CompiledKernel a bf16 launch of the Gluon dk/dv kernel under ``tile`` specialises to."""
    q = torch.zeros(2, seq, heads, head_dim, dtype=torch.bfloat16)
    stats = torch.zeros(2, heads, seq)
    problem = flash_problem(q, q, causal=causal)
    _, args, constexprs, options = flash_dkdv_hopper.launch_arguments(q, q, q, q, q, q, stats, stats, problem, tile)
    return _compile(flash_dkdv_hopper.flash_dkdv_hopper_kernel, args, constexprs, options)


def _sass(cubin: bytes) -> list[str]:
    """The cubin's instructions and labels in order (labels as '.L_x_N:' lines), from triton's bundled nvdisasm."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([str(nvdisasm), "-c", file.name], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in listing.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        instruction = re.search(r"/\*[0-9a-f]{4,}\*/\s*(.*?)\s*;", line)
        if label:
            lines.append(label.group(1) + ":")
        elif instruction:
            lines.append(instruction.group(1))
    return lines


def _opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def tile_loop(cubin: bytes, exponentials: int) -> dict:
    """The consumers' tile loop: the shortest SASS loop (a backward branch) with HGMMA and at least
    ``exponentials`` MUFU in it (a tile's, a thread); its instruction count, MUFU and HGMMA counts, and how many
    its largest forward branch inside it skips."""
    lines = _sass(cubin)
    where = {line[:-1]: i for i, line in enumerate(lines) if line.endswith(":")}
    loops = []
    for end, line in enumerate(lines):
        target = re.search(r"BRA.*`\((\.L_x_\d+)\)", line)
        if target and where.get(target.group(1), end) < end:
            body = lines[where[target.group(1)]:end + 1]
            ops = collections.Counter(_opcode(x) for x in body if not x.endswith(":"))
            if ops["HGMMA"] and ops["MUFU"] >= exponentials:
                loops.append((sum(ops.values()), where[target.group(1)], end, ops))
    size, start, end, ops = min(loops, key=lambda loop: loop[0])
    skipped = 0
    for i in range(start, end):
        target = re.search(r"BRA.*`\((\.L_x_\d+)\)", lines[i])
        if target and i < where.get(target.group(1), -1) <= end:
            skipped = max(skipped, sum(not x.endswith(":") for x in lines[i + 1:where[target.group(1)]]))
    return {"instructions": size, "mufu": ops["MUFU"], "hgmma": ops["HGMMA"], "branch_skips": skipped}


def plan_rows(head_dims) -> list[dict]:
    """One row per plan of flash_fwd_hopper.PLANS at ``head_dims``: its registers, spill bytes, the shared memory
    the compiler allocates, and its tile loop (tile_loop)."""
    rows = []
    for d in head_dims:
        for causal in (False, True):
            for plan in flash_fwd_hopper.PLANS[d, causal]:
                compiled = compile_plan(d, causal, plan)
                registers, stores, loads = _ptxas_usage(compiled.asm["ptx"])
                loop = tile_loop(compiled.asm["cubin"], flash_fwd_hopper.ROWS_PER_CONSUMER * plan.tile.block_n // 128)
                schedule = f"{plan.tile.consumers} consumers, " + ("persistent" if plan.persistent else "per group") + (", paired" if plan.paired else "")
                rows.append(dict(head_dim=d, causal=causal, from_keys=plan.from_keys, schedule=schedule, tile=flash_fwd_hopper.TILES[d].index(plan.tile),
                                 registers=registers, spill_stores=stores, spill_loads=loads, shared=compiled.metadata.shared, **loop))
    return rows


def tile_rows(head_dims) -> list[dict]:
    """One row per tile of flash_fwd_hopper.TILES at ``head_dims`` (the sweep's candidates, in plans or not),
    compiled causal, persistent and paired: its registers, spill bytes and the shared memory the compiler allocates."""
    rows = []
    for d in head_dims:
        for index, tile in enumerate(flash_fwd_hopper.TILES[d]):
            compiled = compile_plan(d, True, flash_fwd_hopper.HopperPlan(0, tile, persistent=True, paired=True))
            registers, stores, loads = _ptxas_usage(compiled.asm["ptx"])
            rows.append(dict(head_dim=d, tile=index, **tile._asdict(), registers=registers, spill_stores=stores, spill_loads=loads,
                             shared=compiled.metadata.shared))
    return rows


def dkdv_rows(head_dims, masks=(False, True)) -> list[dict]:
    """One row per (head dim, mask: causal or not, tile of flash_dkdv_hopper.TILES) of the Gluon dk/dv kernel:
    registers, spill bytes, shared memory and its tile loop (a 64-query tile's 32 exponentials a thread)."""
    rows = []
    for d in head_dims:
        for causal in masks:
            for index, tile in enumerate(flash_dkdv_hopper.TILES):
                compiled = compile_dkdv(d, causal, tile)
                registers, stores, loads = _ptxas_usage(compiled.asm["ptx"])
                rows.append(dict(head_dim=d, causal=causal, tile=index, **tile._asdict(), registers=registers, spill_stores=stores, spill_loads=loads,
                                 shared=compiled.metadata.shared, **tile_loop(compiled.asm["cubin"], flash_dkdv_hopper.BLOCK_M * 64 // 128)))
    return rows


def _spills(row: dict) -> str:
    return f"{row['spill_stores']} / {row['spill_loads']}"


def main() -> None:
    # argparse, not typer: the compile venv for the GPU's triton need hold no more than torch and triton
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(flash_fwd_hopper.HEAD_DIMS))
    parser.add_argument("--json", action="store_true", help="one JSON object of the plans', the tiles' and the dk/dv kernel's rows, no tables")
    parser.add_argument("--dkdv-causal-only", action="store_true", help="the dk/dv kernel compiled causal only (half its compiles)")
    args = parser.parse_args()
    dkdv_masks = (True,) if args.dkdv_causal_only else (False, True)
    if args.json:
        print(json.dumps({"plans": plan_rows(args.head_dim), "tiles": tile_rows(args.head_dim), "dkdv": dkdv_rows(args.head_dim, dkdv_masks)}))
        return
    print(f"{'D':>3s} {'mask':13s} {'from keys':>9s} {'schedule':32s} {'regs':>4s} {'spill st/ld':>11s} {'loop':>5s} {'masking':>7s} {'MUFU':>4s} {'HGMMA':>5s}")
    for row in plan_rows(args.head_dim):
        print(f"{row['head_dim']:3d} {'causal' if row['causal'] else 'bidirectional':13s} {row['from_keys']:9d} {row['schedule']:32s} "
              f"{row['registers']:4d} {_spills(row):>11s} {row['instructions']:5d} {row['branch_skips']:7d} "
              f"{row['mufu']:4d} {row['hgmma']:5d}", flush=True)
    print(f"\n{'D':>3s} {'tile':>4s} {'keys':>4s} {'stages':>6s} {'consumers':>9s} {'per SM':>6s} {'regs':>4s} {'spill st/ld':>11s} {'shared KB':>9s}")
    for row in tile_rows(args.head_dim):
        print(f"{row['head_dim']:3d} {row['tile']:4d} {row['block_n']:4d} {row['stages']:6d} {row['consumers']:9d} {row['per_sm']:6d} "
              f"{row['registers']:4d} {_spills(row):>11s} {row['shared'] / 1024:9.1f}", flush=True)

    print(f"\n{'D':>3s} {'mask':13s} {'dk/dv tile':>10s} {'keys':>4s} {'stages':>6s} {'pipelined':>9s} {'regs':>4s} {'spill st/ld':>11s} {'shared KB':>9s} {'loop':>5s} {'MUFU':>4s} {'HGMMA':>5s}")
    for row in dkdv_rows(args.head_dim, dkdv_masks):
        print(f"{row['head_dim']:3d} {'causal' if row['causal'] else 'bidirectional':13s} {row['tile']:10d} {row['keys']:4d} {row['stages']:6d} "
              f"{'yes' if row['pipelined'] else 'no':>9s} {row['registers']:4d} "
              f"{_spills(row):>11s} {row['shared'] / 1024:9.1f} {row['instructions']:5d} {row['mufu']:4d} {row['hgmma']:5d}", flush=True)


if __name__ == "__main__":
    main()
