"""bench/devtools/hopper_sass.py: every plan and tile of the Hopper forward compiles for sm_90a with the triton
here (so an API that a newer triton removed fails on the CPU, not on the GPU); each plan's consumers' tile loop
keeps the shape its speed depends on (one tile's exponentials, the masking branched around for the tiles that
need none), and each tile's per_sm programs fit an SM together. The compiles run in a process of their own
without TRITON_INTERPRET (conftest.py sets it, and triton's interpreted language functions cannot be compiled)."""

import json
import os
import subprocess
import sys

import pytest

from attnbench.kernels import flash_dkdv_hopper, flash_fwd_hopper


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "attnbench.devtools.hopper_sass", "--json", "--dkdv-causal-only"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_every_plan_and_tile_is_compiled(compiled):
    assert len(compiled["plans"]) == sum(map(len, flash_fwd_hopper.PLANS.values()))
    assert len(compiled["tiles"]) == sum(map(len, flash_fwd_hopper.TILES.values()))
    assert {(row["head_dim"], row["causal"], row["tile"]) for row in compiled["dkdv"]} == {
        (d, True, tile) for d in flash_fwd_hopper.HEAD_DIMS for tile in range(len(flash_dkdv_hopper.TILES))}, "causal: the more registers"


def test_each_plan_issues_one_tiles_exponentials_with_the_masking_branched(compiled):
    for row in compiled["plans"]:
        tile = flash_fwd_hopper.TILES[row["head_dim"]][row["tile"]]
        assert 0 < row["registers"] <= tile.max_registers, row
        per_thread = flash_fwd_hopper.ROWS_PER_CONSUMER * tile.block_n // 128
        assert per_thread <= row["mufu"] <= per_thread + 4, f"a tile's exponentials and the rescale's, none issued twice: {row}"
        assert row["branch_skips"] >= per_thread, f"the masking (one select an element at least) is skipped by unmasked tiles: {row}"


def test_each_tiles_programs_fit_an_sm_together(compiled):
    """per_sm programs of a tile's shape fit one SM: their registers at launch, the consumers' after setmaxnreg
    (the producer's warpgroup keeps at least 24), and the shared memory the compiler allocates (227 KB an SM)."""
    for row in compiled["tiles"]:
        tile = flash_fwd_hopper.TILES[row["head_dim"]][row["tile"]]
        warpgroups = tile.consumers + 1
        assert tile.per_sm * warpgroups * 128 * tile.max_registers <= 65536, row
        assert tile.consumers * tile.consumer_registers + 24 <= warpgroups * tile.max_registers, row
        assert tile.shared_bytes(row["head_dim"]) <= row["shared"] <= tile.shared_bytes(row["head_dim"]) + 1024, f"the barriers: {row}"
        assert tile.per_sm * row["shared"] <= 227 * 1024, row


def test_the_dkdv_kernel_holds_k_v_and_its_ring_with_one_tiles_exponentials(compiled):
    """The Gluon dk/dv kernel under each tile: k and v of its keys and its stages of q and dO tiles in shared memory
    (one program an SM at least), a 64 x 64 tile's 32 exponentials a thread in its tile loop with every product on
    wgmma."""
    for row in compiled["dkdv"]:
        d, keys = row["head_dim"], row["keys"]
        expected = 2 * keys * d * 2 + row["stages"] * 2 * flash_dkdv_hopper.BLOCK_M * d * 2
        assert expected <= row["shared"] <= expected + 1024 and row["shared"] <= 227 * 1024, row
        assert 0 < row["registers"] <= 255, row
        assert 32 <= row["mufu"] <= 36 and row["hgmma"] > 0, row
