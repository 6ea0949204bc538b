"""The tile sweep: on a GPU, one row per tile (forcing a tile: tests/kernels/test_flash_launch.py)."""

import pytest
from typer.testing import CliRunner

from attnbench.devtools import tile_sweep
from attnbench.devtools.tile_sweep import sweep


@pytest.mark.cuda
def test_sweep_times_every_candidate_and_cudnn():
    candidates = {"fwd": [(64, 64, 4, 2)], "dkdv": [(32, 64, 4, 2), (64, 64, 4, 2, 168)], "dq": [(64, 64, 4, 2)]}
    rows = sweep(batch=2, seq=256, heads=2, head_dim=64, candidates=candidates, loads=("tma", "pointer"))
    assert rows["kernel"].tolist() == ["fwd", "dkdv", "dkdv", "dq"] * 2 + ["cudnn-fwd", "cudnn-bwd"]
    assert rows["loads"].tolist() == ["tma"] * 4 + ["pointer"] * 4 + ["", ""]
    assert rows["max_registers"].tolist() == [0, 0, 168, 0] * 2 + [0, 0]
    assert (rows["ms"] > 0).all()


@pytest.mark.cuda
def test_a_kernel_left_out_is_held_at_its_first_choice():
    rows = sweep(batch=2, seq=256, heads=2, head_dim=64, candidates={"dq": [(64, 64, 4, 2)]})
    assert rows["kernel"].tolist() == ["dq", "cudnn-fwd", "cudnn-bwd"]


@pytest.mark.parametrize("option", [["--loads", "pointers"], ["--kernels", "fused"]])
def test_unknown_loads_or_kernel_is_a_usage_error(option):
    app = tile_sweep.typer.Typer()
    app.command()(tile_sweep.main)
    result = CliRunner().invoke(app, option)
    assert result.exit_code == 2 and option[1] in result.output
