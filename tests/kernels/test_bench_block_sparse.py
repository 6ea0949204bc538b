"""The block-sparse benchmark's CPU side: the plan, its random masks and FLOPs, the dry run's CSV,
and our two impls' ops under the interpreter."""

import csv

import pytest
import torch

from attnbench.kernels import bench_block_sparse
from attnbench.kernels.bench_block_sparse import Case, density_of, random_causal_mask
from attnbench.kernels.flash_launch import SPARSE_TILE


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 1.0])
def test_masks_are_causal_keep_the_diagonal_and_hit_the_density(density):
    mask = random_causal_mask(Case("triton-sparse", "fwd", 4, 4096, 64, density))
    n = mask.shape[-1]
    assert mask.shape == (4, 16, n, n) and n == 64
    assert not mask.triu(1).any(), "nothing past the diagonal"
    assert mask[..., torch.arange(n), torch.arange(n)].all(), "the diagonal"
    assert abs(density_of(mask) - density) < 0.01


def test_flops_follow_the_kept_blocks():
    dense = bench_block_sparse.flops(Case("triton-dense", "fwd", 4, 4096, 64, 1.0))
    assert dense == 4 * 4 * 16 * 64 * (4096 * 4097 // 2)
    sparse = bench_block_sparse.flops(Case("triton-sparse", "fwd", 4, 4096, 64, 0.25))
    assert 0.2 < sparse / dense < 0.3
    assert bench_block_sparse.flops(Case("triton-sparse", "fwdbwd", 4, 4096, 64, 0.25)) == 3.5 * sparse


def test_dry_run_writes_every_case_of_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    assert bench_block_sparse.main(["--dry-run", "--out", str(out), "--seq", "4096", "16384", "--head-dim", "64"]) == 0
    rows = list(csv.DictReader(out.open()))
    sparse = len(bench_block_sparse.SPARSE_IMPLS) * 2 * 2 * 4  # impls x modes x lengths x densities
    assert len(rows) == sparse + len(bench_block_sparse.DENSE_IMPLS) * 2 * 2
    assert tuple(rows[0]) == bench_block_sparse.COLUMNS and {row["status"] for row in rows} == {"skipped"}
    assert {row["batch"] for row in rows if row["seq"] == "16384"} == {"1"}
    assert "flex-sparse" in capsys.readouterr().out


def test_refuses_to_time_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_block_sparse.main(["--out", str(tmp_path / "x.csv")]) == 2


@pytest.mark.parametrize("impl", ["triton-sparse", "triton-dense"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_our_ops_build_and_run_under_the_interpreter(impl, mode):
    case = Case(impl, mode, 1, 3 * SPARSE_TILE, 16, 0.5, heads=2, block=SPARSE_TILE, dtype="float32")
    out = bench_block_sparse.build(case, torch.device("cpu"))()
    assert all(torch.isfinite(x).all() for x in (out if mode == "fwdbwd" else [out]))
