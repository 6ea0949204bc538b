"""The decode benchmark's CPU side: the plan, the bytes each step must move, the dry run's CSV."""

import csv

import pytest
import torch

from attnbench.kernels import bench_decode
from attnbench.kernels.bench_decode import Case


def test_bytes_are_the_cache_or_the_state_moved_once_plus_the_token():
    q_and_o = 2 * 32 * 128 * 2  # a sequence's query read and output written, Hq = 32, bf16
    assert Case("triton", 32, 4096).bytes == 32 * (2 * 4096 * 8 * 128 * 2 + q_and_o)  # K and V, bf16
    assert Case("triton-paged", 1, 1024).bytes == Case("sdpa-cudnn", 1, 1024).bytes
    qkvo_beta = (4 * 32 * 128 + 32) * 2  # q, k, v read and o written per head, beta per head, bf16
    assert Case("triton-deltanet-step", 32, 0, kv_heads=32).bytes == 32 * (2 * 32 * 128 * 128 * 4 + qkvo_beta)  # float32 state, read and written


def test_dry_run_writes_every_case_of_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    assert bench_decode.main(["--dry-run", "--out", str(out), "--batch", "1", "32", "--context", "1024", "65536"]) == 0
    rows = list(csv.DictReader(out.open()))
    softmax = len(bench_decode.SOFTMAX_IMPLS) * 2 * 2
    assert len(rows) == softmax + len(bench_decode.STATE_IMPLS) * 2
    assert {row["status"] for row in rows} == {"skipped"}
    assert tuple(rows[0]) == bench_decode.COLUMNS
    ours = [row for row in rows if row["impl"] == "triton" and row["batch"] == "1" and row["context"] == "65536"]
    assert int(ours[0]["splits"]) > 1 and all(row["splits"] == "" for row in rows if row["impl"].startswith("sdpa"))
    assert "triton-paged" in capsys.readouterr().out


def test_steps_build_and_run_under_the_interpreter():
    """Every impl of ours builds its inputs and steps at a tiny size (the GPU path's CPU side)."""
    for impl in ("triton", "triton-paged", *bench_decode.STATE_IMPLS):
        case = Case(impl, 2, 128, heads=4, kv_heads=2, head_dim=16, page=16, dtype="float32")
        out = bench_decode.build(case, torch.device("cpu"))()
        assert torch.isfinite(out).all(), impl


def test_refuses_to_time_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_decode.main(["--out", str(tmp_path / "x.csv")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_shape_options_reach_every_case(tmp_path):
    out = tmp_path / "plan.csv"
    argv = ["--dry-run", "--out", str(out), "--batch", "2", "--context", "512", "--heads", "8", "--kv-heads", "2", "--page", "16"]
    assert bench_decode.main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert all(row["heads"] == "8" and row["page"] == "16" for row in rows)
    assert {row["kv_heads"] for row in rows if row["impl"] in bench_decode.STATE_IMPLS} == {"8"}
    assert {row["kv_heads"] for row in rows if row["impl"] not in bench_decode.STATE_IMPLS} == {"2"}


def test_bad_sizes_are_usage_errors(tmp_path):
    for argv in (["--batch", "0"], ["--heads", "6", "--kv-heads", "4"]):
        with pytest.raises(SystemExit) as exit_:
            bench_decode.main(["--dry-run", "--out", str(tmp_path / "x.csv"), *argv])
        assert exit_.value.code == 2


def test_a_refusal_is_a_row_with_its_reasons(monkeypatch):
    """SDPA pinned to a backend that cannot run the case raises, after warnings that say why."""

    def refusing():
        import warnings

        warnings.warn("Flash attention does not support enable_gqa with this shape")
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(bench_decode, "build", lambda case, device: refusing)
    row = bench_decode.measure(Case("sdpa-efficient", 1, 1024), torch.device("cpu"), False, None)
    assert row["status"] == "unsupported" and "enable_gqa" in row["message"] and row["impl"] == "sdpa-efficient"


def test_out_of_memory_skips_the_longer_contexts_of_its_series(tmp_path, monkeypatch):
    def oom(case, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16 GiB")

    monkeypatch.setattr(bench_decode, "build", oom)
    assert bench_decode.measure(Case("triton", 64, 65536), torch.device("cpu"), False, None)["status"] == "oom"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_decode, "copy_bandwidth", lambda device: 4000.0)
    monkeypatch.setattr(bench_decode, "sm_count", lambda device: 132)
    monkeypatch.setattr(bench_decode, "measure", lambda case, *args: {**bench_decode._row(case, 132, False), "status": "oom", "message": "oom"})
    out = tmp_path / "x.csv"
    assert bench_decode.main(["--out", str(out), "--impl", "triton", "--batch", "64", "--context", "1024", "4096", "16384"]) == 0
    assert [row["status"] for row in csv.DictReader(out.open())] == ["oom", "skipped", "skipped"]
