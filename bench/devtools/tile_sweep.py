"""Which tile each flash kernel should try first: every candidate forward, dk/dv and dq tile
timed on its own on one problem, next to cuDNN's forward and backward (CUDA only).

    python3 -m attnbench.devtools.tile_sweep --seq 1024 --seq 4096 --heads 8 --head-dim 64 --out tiles.csv

(the defaults are GPT small's attention at 16k tokens per step; --loads tma --loads pointer
times every tile both with the loops' tiles read through TMA descriptors and through pointers;
--kernels picks which of fwd, dkdv, dq to sweep). The forward is timed alone, the portable kernel's
tiles and then, on Hopper, the warp-specialised kernel (kernels/flash_fwd_hopper.py) as 'hopper-fwd'
(its consumers taking turns, one program per SM), 'hopper-fwd-free' (no turns) and
'hopper-fwd-per-item' (one program per work item), 'hopper-fwd-heads' (per item, head by head),
'hopper-fwd-persistent-heads' (one program per SM, head by head), 'hopper-fwd-pairs' and
'hopper-fwd-persistent-pairs' (the same with a head's query blocks n - 1 - i and i as one work group, every
causal group the same cost; flash_fwd_hopper.PLANS takes each head dim and mask's from these rows); a dk/dv candidate is timed as the whole
backward with dq held at its current first choice, and a dq candidate with
dk/dv held at the fastest dk/dv found, so within a kernel the rows rank its tiles. The kernels'
own lists (kernels/flash_fwd.py, kernels/flash_bwd.py) are edited by hand from what this prints.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Callable

import pandas as pd
import torch
import typer

from attnbench.kernels import flash_fwd_hopper, flash_launch
from attnbench.kernels.flash import flash_problem
from attnbench.kernels.flash_bwd import flash_backward, flash_dkdv_kernel, flash_dq_kernel
from attnbench.kernels.flash_fwd import flash_forward, flash_fwd_kernel
from attnbench.kernels.flash_launch import candidates_for, tile_config
from attnbench.timing import measure

# (BLOCK_M, BLOCK_N, warps, stages[, max registers per thread]): neighbours of the kernels' lists at
# D = 64 (each kernel's own list for the D swept is timed too, first)
CANDIDATES = {
    "fwd": [
        (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3),
        (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 4), (64, 32, 4, 5),
    ],
    "dkdv": [
        (32, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2), (16, 128, 4, 3), (32, 128, 4, 3), (32, 64, 4, 3),
        (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 3), (128, 128, 8, 2), (64, 64, 8, 3), (32, 128, 4, 2), (32, 64, 4, 2),
        # three or four programs per SM instead of two (235 and 178 registers without a cap)
        (64, 64, 4, 3, 168), (32, 64, 4, 3, 168), (32, 64, 4, 3, 128), (32, 64, 4, 4, 168),
    ],
    "dq": [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 4), (64, 32, 4, 3)],
}
NO_TILE = (0, 0, 0, 0, 0)
# the Hopper forward's schedules timed: (its consumers taking turns, one program per SM, items head by head, two
# query blocks a work group, row name)
HOPPER_SCHEDULES = (
    (True, True, False, False, "hopper-fwd"), (False, True, False, False, "hopper-fwd-free"),
    (True, False, False, False, "hopper-fwd-per-item"), (True, False, True, False, "hopper-fwd-heads"),
    (True, True, True, False, "hopper-fwd-persistent-heads"), (True, False, True, True, "hopper-fwd-pairs"),
    (True, True, True, True, "hopper-fwd-persistent-pairs"),
)
KERNELS = {"fwd": flash_fwd_kernel, "dkdv": flash_dkdv_kernel, "dq": flash_dq_kernel}


def time_ms(fn: Callable[[], object], device: torch.device) -> float | None:
    """Median ms of ``fn`` (compiled outside the timing), or None where it fails to compile or launch (printed)."""
    try:
        fn()  # compile outside the timed region
        return measure(fn, device).median_ms
    except Exception as error:  # a tile that does not fit (shared memory, registers) is a row, not a crash
        typer.echo(f"  failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
        return None


def sweep(
    batch: int, seq: int, heads: int, head_dim: int, causal: bool = True, candidates=CANDIDATES, loads: tuple[str, ...] = ("tma",)
) -> pd.DataFrame:
    """Rows (kernel, block_m, block_n, warps, stages, max_registers, loads, ms) for every tile in ``candidates``
    (kernel name -> tiles; a kernel left out is held at its first choice where another needs it)
    with each way of loading tiles in ``loads`` ('tma': descriptors where the GPU has them,
    'pointer'), then cuDNN's fwd and bwd as kernels 'cudnn-fwd', 'cudnn-bwd'."""
    device = torch.device("cuda")
    q, k, v, do = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(4))
    problem = flash_problem(q, k, causal=causal)
    o, lse = flash_forward(q, k, v, problem)
    rows = []
    for way in loads:
        with _loads(way):
            _sweep_tiles(rows, q, k, v, o, lse, do, problem, {**candidates_at(head_dim, False), **candidates}, candidates, way)
    _add_cudnn(lambda *args: _add(rows, *args, loads=""), q, k, v, do, causal)
    return pd.DataFrame(rows).assign(batch=batch, seq=seq, heads=heads, head_dim=head_dim, causal=causal)


def candidates_at(head_dim: int, neighbours: bool = True) -> dict[str, list[tuple[int, int, int, int, int]]]:
    """Each kernel's own list at ``head_dim`` (first choice first), then (neighbours) CANDIDATES' other
    tiles, as (BLOCK_M, BLOCK_N, warps, stages, max registers or 0)."""
    merged = {}
    for kernel, tiles in CANDIDATES.items():
        own = [
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg or 0)
            for c in candidates_for(KERNELS[kernel].by_head_dim, head_dim)
        ]
        merged[kernel] = own + [_five(tile) for tile in tiles if _five(tile) not in own and neighbours]
    return merged


def _five(tile: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    """A tile as (BLOCK_M, BLOCK_N, warps, stages, max registers): four numbers get 0, the compiler's choice."""
    return (*tile, 0)[:5]


@contextlib.contextmanager
def _loads(way: str):
    saved = flash_launch.TMA_LOADS
    flash_launch.TMA_LOADS = way == "tma"
    try:
        yield
    finally:
        flash_launch.TMA_LOADS = saved


@contextlib.contextmanager
def _hopper_forward(
    on: bool, pingpong: bool = True, persistent: bool = True, head_by_head: bool = False, paired: bool = False,
    tile: flash_fwd_hopper.HopperTile | None = None,
):
    """The Hopper forward kernel switched on or off (off: the portable kernel's tiles are what is swept),
    its consumers taking turns (pingpong) or not, one program per SM (persistent) or per work group, its
    items head by head or not, two query blocks a group (paired) or one, with ``tile`` at its head dim."""
    settings = {
        "PLANS": flash_fwd_hopper.plans(0, tile, persistent, paired) if on else flash_fwd_hopper.NOWHERE,
        "PINGPONG": pingpong, "HEAD_BY_HEAD": head_by_head,
    }
    saved = {name: getattr(flash_fwd_hopper, name) for name in settings}
    for name, value in settings.items():
        setattr(flash_fwd_hopper, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(flash_fwd_hopper, name, value)


def _add(rows: list, kernel: str, tile: tuple[int, ...], fn: Callable[[], object], held=(), loads: str = "") -> float | None:
    """Time ``fn`` with ``kernel`` forced to ``tile`` and the ``held`` (kernel, tile) pairs; append a row."""
    tile = _five(tile)
    with contextlib.ExitStack() as stack:
        for held_kernel, held_tile in held:
            stack.enter_context(KERNELS[held_kernel].forced(tile_config(*held_tile)))
        if kernel in KERNELS:
            stack.enter_context(KERNELS[kernel].forced(tile_config(*tile)))
        ms = time_ms(fn, torch.device("cuda"))
    rows.append(dict(zip(("kernel", "block_m", "block_n", "warps", "stages", "max_registers", "loads", "ms"), (kernel, *tile, loads, ms))))
    typer.echo(f"{kernel:10s} {loads:8s} {tile} {ms if ms is None else round(ms, 4)} ms")
    return ms


def _sweep_tiles(rows, q, k, v, o, lse, do, problem, tiles, swept, loads: str) -> None:
    """Time the tiles of the kernels in ``swept``; ``tiles`` has every kernel's, for holding."""

    def add(kernel, tile, fn, held=()):
        return _add(rows, kernel, tile, fn, held, loads)

    forward = lambda: flash_forward(q, k, v, problem)  # noqa: E731
    backward = lambda: flash_backward(q, k, v, o, lse, do, problem)  # noqa: E731
    with _hopper_forward(False):
        for tile in swept.get("fwd", []):
            add("fwd", tile, forward)
    for hopper_tile in flash_fwd_hopper.TILES.get(problem.head_dim, []) if swept.get("fwd") else []:
        for pingpong, persistent, head_by_head, paired, name in HOPPER_SCHEDULES:
            with _hopper_forward(True, pingpong, persistent, head_by_head, paired, hopper_tile):
                if flash_fwd_hopper.hopper_route(problem, q, k, v) is None:
                    consumers = hopper_tile.consumers
                    add(name, (64 * consumers, hopper_tile.block_n, 4 * (consumers + 1), hopper_tile.stages, hopper_tile.max_registers), forward)
    timed = {tile: add("dkdv", tile, backward, held=[("dq", tiles["dq"][0])]) for tile in swept.get("dkdv", [])}
    best_dkdv = min((tile for tile in timed if timed[tile] is not None), key=timed.get, default=tiles["dkdv"][0])
    for tile in swept.get("dq", []):
        add("dq", tile, backward, held=[("dkdv", best_dkdv)])


def _add_cudnn(add, q, k, v, do, causal: bool) -> None:
    """cuDNN's forward, and its backward alone (autograd.grad over a retained graph)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v)]  # (B, H, T, D), what SDPA takes
    grad_out = do.transpose(1, 2)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        forward = lambda: torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)  # noqa: E731
        add("cudnn-fwd", NO_TILE, forward)
        out = forward()
        add("cudnn-bwd", NO_TILE, lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True))


def main(
    seq: Annotated[list[int], typer.Option(help="T (repeat the option for several)")] = [1024, 4096],  # noqa: B006
    tokens: Annotated[int, typer.Option(help="B*T, held fixed across --seq")] = 16384,
    heads: Annotated[int, typer.Option(help="H")] = 8,
    head_dim: Annotated[int, typer.Option(help="D")] = 64,
    causal: Annotated[bool, typer.Option(help="causal or bidirectional")] = True,
    loads: Annotated[list[str], typer.Option(help="tma (descriptors where the GPU has them) and/or pointer")] = ["tma"],  # noqa: B006
    neighbours: Annotated[bool, typer.Option(help="also the D = 64 neighbours of the kernels' own lists")] = True,
    kernels: Annotated[list[str], typer.Option(help="which to sweep: fwd, dkdv, dq (repeat the option)")] = list(CANDIDATES),  # noqa: B006
    out: Annotated[Path, typer.Option(help="CSV of every timing")] = Path("tiles.csv"),
) -> None:
    """Time every candidate tile of the flash kernels on each T; prints and writes a CSV."""
    unknown = sorted(set(loads) - {"tma", "pointer"})
    if unknown:
        raise typer.BadParameter(f"--loads takes tma or pointer, not {', '.join(unknown)}")
    unknown = sorted(set(kernels) - set(CANDIDATES))
    if unknown:
        raise typer.BadParameter(f"--kernels takes {', '.join(CANDIDATES)}, not {', '.join(unknown)}")
    frames = []
    for t in seq:
        b = max(1, tokens // t)
        typer.echo(f"B={b} T={t} H={heads} D={head_dim} causal={causal}")
        candidates = {kernel: tiles for kernel, tiles in candidates_at(head_dim, neighbours).items() if kernel in kernels}
        frames.append(sweep(b, t, heads, head_dim, causal, candidates, tuple(loads)))
        pd.concat(frames).to_csv(out, index=False)  # a sweep cut short keeps the finished T


if __name__ == "__main__":
    typer.run(main)
