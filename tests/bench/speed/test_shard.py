"""`speed --gpus N`: cases split by series over worker processes, rows merged by the parent
(on CPU the workers are plain processes: the code path a multi-GPU host runs)."""

import pytest

from attnbench import store
from attnbench.errors import InputError
from attnbench.speed.shard import run_sharded, split_by_series
from attnbench.speed.run import check_workers
from attnbench.speed.sweep import Sweep, SweepSpec, expand


def spec(**overrides):
    base = dict(mechanisms=["standard", "alibi"], impls=["torch", "sdpa"], levels=["kernel"], modes=["fwd", "bwd"],
                dtypes=["fp32"], device="cpu", seqs=[8, 16, 32], batches=[2], heads=2, head_dim=8, causal=[True])
    return SweepSpec(**{**base, **overrides})


def test_every_series_stays_whole_on_one_worker_and_shares_balance():
    cases = expand(spec())
    shares = split_by_series(cases, 3)
    spread = [c for share in shares for c in share]
    assert len(spread) == len(cases) and set(spread) == set(cases), "each case exactly once"
    for share in shares:
        for case in share:
            owners = [i for i, s in enumerate(shares) if any(c.series() == case.series() for c in s)]
            assert len(owners) == 1, f"series of {case} split over workers {owners}"
        sizes = [c.seq for c in share if c.series() == share[0].series()]
        assert sizes == sorted(sizes), "smaller sizes first, so an OOM skips what follows"
    lengths = sorted(len(s) for s in shares)
    assert lengths[-1] - lengths[0] <= 3  # series of 3 sizes: balanced to within one series


def test_two_workers_record_the_cases_one_process_records(tmp_path):
    cases = expand(spec())
    rows, steps = [], []
    run_sharded(cases, 2, rows.append, lambda phase, case: steps.append(phase))
    single = []
    Sweep(cases, single.append).run()
    assert sorted(store.case_key(r) for r in rows) == sorted(store.case_key(r) for r in single)
    assert {r["status"] for r in rows} == {"ok"}
    assert len(steps) == 2 * len(cases), "warm-up and timing reported for every case"


def test_cli_resume_with_workers_runs_only_what_is_missing(tmp_path):
    from typer.testing import CliRunner

    from attnbench.cli import app

    out = tmp_path / "run"
    args = ["speed", "--seq", "8", "16", "--impl", "torch", "--mode", "fwd", "--heads", "2", "--head-dim", "8",
            "--device", "cpu", "--batch", "2", "--attn", "standard,rope", "--out", str(out)]
    first = CliRunner().invoke(app, [*args, "--gpus", "2"])
    assert first.exit_code == 0, first.output
    rows = store.read_rows(out / "speed.csv")
    assert len(rows) == 4
    (out / "speed.csv").write_text("".join((out / "speed.csv").read_text().splitlines(keepends=True)[:3]))  # lose 2 rows
    again = CliRunner().invoke(app, ["speed", "--resume", "--out", str(out), "--gpus", "2"])
    assert again.exit_code == 0, again.output
    keys = [store.case_key(r) for r in store.read_rows(out / "speed.csv")]
    assert sorted(keys) == sorted(store.case_key(r) for r in rows) and len(set(keys)) == 4


@pytest.mark.parametrize("device, gpus, match", [("cpu", 0, "positive"), ("cuda:1", 2, "GPUs 0..N-1")])
def test_bad_worker_counts_are_input_errors(device, gpus, match):
    with pytest.raises(InputError, match=match):
        check_workers(device, gpus)
