"""bench/devtools/exposb_tile_sweep.py: a forced tile is the one the launcher takes, and only inside
its block; on CUDA a sweep at a small size times every candidate and the standard kernel beside them."""

import pytest
import torch

from attnbench.devtools import exposb_tile_sweep
from attnbench.kernels import exposb_launch


def test_a_forced_tile_is_what_the_launcher_takes_inside_the_block_only():
    def taken(head_dim, kernel, causal=True):  # what a CUDA launch would take (kernel_tiles reads only the device's type)
        return exposb_launch.kernel_tiles(torch.device("cuda"), head_dim, kernel, torch.bfloat16, causal)

    before, other, dkdv = taken(128, "dq"), taken(64, "dq"), taken(128, "dkdv")
    with exposb_tile_sweep._forced(128, "dq", (16, 32, 2, 1)):
        assert taken(128, "dq") == (16, 32, {"num_warps": 2, "num_stages": 1})
        assert taken(96, "dq") == taken(128, "dq"), "a head dim between entries reads the larger one"
        assert taken(64, "dq") == other and taken(128, "dkdv") == dkdv, "one kernel at one head dim"
    assert taken(128, "dq") == before
    forced = (16, 64, 2, 1)
    with exposb_tile_sweep._forced(128, "dkdv", forced):
        assert taken(128, "dkdv", causal=False) == taken(128, "dkdv") == (16, 64, {"num_warps": 2, "num_stages": 1}), "either mask"
    assert taken(128, "dkdv") == dkdv


def test_bidirectional_dkdv_keeps_its_own_tile_where_one_is_listed():
    def taken(kernel, causal):
        return exposb_launch.kernel_tiles(torch.device("cuda"), 128, kernel, torch.bfloat16, causal)

    bidirectional = exposb_launch._GPU_TILES[128]["dkdv-bidirectional"]
    assert taken("dkdv", False)[:2] == bidirectional[:2] and taken("dkdv", False)[2]["num_warps"] == bidirectional[2]
    assert taken("dkdv", True) != taken("dkdv", False)
    assert taken("dq", True) == taken("dq", False), "kernels without a bidirectional entry take one tile for both masks"


@pytest.mark.cuda
def test_a_small_sweep_times_every_candidate_and_the_standard_kernel():
    torch.manual_seed(0)
    rows = exposb_tile_sweep.sweep(batch=1, seq=256, heads=2, head_dim=64, causal=True)
    for kernel, tiles in exposb_tile_sweep.CANDIDATES.items():
        timed = rows[rows.kernel == kernel]
        assert len(timed) >= len(tiles) and timed.ms.notna().any(), kernel
    assert rows[rows.kernel.str.startswith("standard")].ms.notna().all()
