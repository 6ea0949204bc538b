"""Which tiles ExpoSB's kernels should take: every candidate forward, dq and dk/dv tile timed on its
own (CUDA only), beside the standard kernel's forward and backward on the same problem.

    python3 -m attnbench.devtools.exposb_tile_sweep --seq 1024 --seq 4096 --head-dim 128 --out tiles.csv

(bf16, B*T = --tokens, H*D = 2048, causal unless --bidirectional). A forward tile is timed as the
forward after the keys' prepass (exposb_forward); a dq tile as the backward with dk/dv at its current
tile, a dk/dv tile as the backward with dq at the fastest dq found, so within a kernel the rows
rank its tiles. kernels/exposb_launch.py's _GPU_TILES is edited by hand from what this prints.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer

from attnbench.devtools.tile_sweep import time_ms
from attnbench.kernels import exposb_launch
from attnbench.kernels.flash import flash_problem
from attnbench.kernels.flash_bwd import flash_backward
from attnbench.kernels.flash_fwd import flash_forward

# (BLOCK_M, BLOCK_N, warps, stages): neighbours of _GPU_TILES' entries (each head dim's own tile is timed first)
CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3), (64, 128, 4, 2),
            (128, 64, 4, 2)],
    "dq": [(64, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 3), (128, 32, 4, 3), (32, 64, 4, 3), (64, 32, 8, 2),
           (64, 16, 4, 3)],
    "dkdv": [(32, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 3), (64, 32, 4, 3), (32, 128, 4, 2), (64, 64, 8, 2),
             (16, 64, 4, 3)],
}
# the layer's initial values (models/attention/exposb.py's DEFAULTS) but a band gain, so every factor works
PARAMS = dict(lam=-math.log(0.98), alpha=0.1, beta=1.0, gamma=0.5, delta=0.001)


@contextlib.contextmanager
def _forced(head_dim: int, kernel: str, tile: tuple[int, int, int, int]):
    """exposb_launch's tile for ``kernel`` at ``head_dim`` (under either mask) replaced by ``tile`` for the block."""
    tiles = exposb_launch.gpu_tiles(head_dim)
    names = {exposb_launch.tile_entry(tiles, kernel, causal) for causal in (True, False)}
    saved = {name: tiles[name] for name in names}
    tiles.update(dict.fromkeys(names, tile))
    try:
        yield
    finally:
        tiles.update(saved)


def sweep(batch: int, seq: int, heads: int, head_dim: int, causal: bool) -> pd.DataFrame:
    """Rows (kernel, block_m, block_n, warps, stages, ms): every tile of CANDIDATES (own tile first), then the
    standard kernel's forward and backward as kernels 'standard-fwd', 'standard-bwd' (tile 0)."""
    device = torch.device("cuda")
    q, k, v, do = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(4))
    params = {name: torch.full((heads,), value, device=device) for name, value in PARAMS.items()}
    params.update(mu=torch.full((heads,), head_dim / 2, device=device), sigma=torch.full((heads,), head_dim / 4, device=device))
    k_t = exposb_launch.exposb_transform(k, heads, 0, params)
    o, lse, q_t = exposb_launch.exposb_forward(q, k_t, v, params, causal, None, torch.float32, keep_q_t=True)
    forward = lambda: exposb_launch.exposb_forward(q, k_t, v, params, causal, None, q.dtype)  # noqa: E731
    backward = lambda: exposb_launch.exposb_backward(q, k, q_t, k_t, v, o, lse, do, params, causal, None)  # noqa: E731
    own = {kernel: exposb_launch.kernel_tiles(device, head_dim, kernel, q.dtype, causal) for kernel in CANDIDATES}
    rows = []

    def add(kernel, tile, fn, held=None):  # ExpoSB's kernels forced to ``tile``; the standard kernel's rows as they are
        forced = ([(kernel, tile)] if kernel in CANDIDATES else []) + ([held] if held else [])
        with contextlib.ExitStack() as stack:
            for forced_kernel, forced_tile in forced:
                stack.enter_context(_forced(head_dim, forced_kernel, forced_tile))
            ms = time_ms(fn, device)
        rows.append(dict(zip(("kernel", "block_m", "block_n", "warps", "stages", "ms"), (kernel, *tile, ms))))
        typer.echo(f"{kernel:12s} {tile} {ms if ms is None else round(ms, 4)} ms")
        return ms

    def candidates(kernel):
        block_m, block_n, launch = own[kernel]
        first = (block_m, block_n, launch["num_warps"], launch["num_stages"])
        return [first] + [tile for tile in CANDIDATES[kernel] if tile != first]

    for tile in candidates("fwd"):
        add("fwd", tile, forward)
    timed = {tile: add("dq", tile, backward) for tile in candidates("dq")}
    best_dq = min((tile for tile in timed if timed[tile] is not None), key=timed.get, default=candidates("dq")[0])
    for tile in candidates("dkdv"):
        add("dkdv", tile, backward, held=("dq", best_dq))
    problem = flash_problem(q, k, causal=causal)
    o_std, lse_std = flash_forward(q, k, v, problem)
    add("standard-fwd", (0, 0, 0, 0), lambda: flash_forward(q, k, v, problem))
    add("standard-bwd", (0, 0, 0, 0), lambda: flash_backward(q, k, v, o_std, lse_std, do, problem))
    return pd.DataFrame(rows).assign(batch=batch, seq=seq, heads=heads, head_dim=head_dim, causal=causal)


def main(
    seq: Annotated[list[int], typer.Option(help="T (repeat the option for several)")] = [1024, 4096],  # noqa: B006
    tokens: Annotated[int, typer.Option(help="B*T, held fixed across --seq")] = 16384,
    head_dim: Annotated[int, typer.Option(help="D (H = 2048 / D)")] = 128,
    causal: Annotated[bool, typer.Option("--causal/--bidirectional", help="causal or bidirectional")] = True,
    out: Annotated[Path, typer.Option(help="CSV of every timing")] = Path("exposb-tiles.csv"),
) -> None:
    """Time every candidate tile of ExpoSB's kernels on each T; prints and writes a CSV."""
    if head_dim not in (32, 64, 128, 256):
        raise typer.BadParameter(f"--head-dim takes 32, 64, 128 or 256, not {head_dim}")
    frames = []
    for t in seq:
        b, heads = max(1, tokens // t), max(1, 2048 // head_dim)
        typer.echo(f"B={b} T={t} H={heads} D={head_dim} causal={causal}")
        frames.append(sweep(b, t, heads, head_dim, causal))
        pd.concat(frames).to_csv(out, index=False)  # a sweep cut short keeps the finished T


if __name__ == "__main__":
    typer.run(main)
