"""`attnbench speed --lengths` through typer's CliRunner: one packed variable-length batch, rows
with the lengths asked, the pack, its mean, packed and padded FLOPs; ok rows for the impls CPU
runs, unsupported rows with their reasons for the others; the layer level; a resumed packed
sweep records nothing twice."""

import csv
import json

import pytest
from typer.testing import CliRunner

from attnbench import flops, store
from attnbench.cli import app
from attnbench.models import registry
from attnbench.models.registry import LayerConfig
from attnbench.speed import lengths, sweep

runner = CliRunner()
SMALL = ["--device", "cpu", "--heads", "2", "--head-dim", "16"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows_of(run_dir):
    with open(run_dir / store.SPEED_CSV, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """The issue's CPU command, causal and bidirectional (SDPA runs nested tensors bidirectional on CPU)."""
    out = tmp_path_factory.mktemp("packed") / "run"
    result = invoke("speed", "--attn", "standard", "--lengths", "uniform:16-64", "--tokens", 256, "--mode", "fwdbwd",
                    "--causal", "--bidirectional", *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    return out, rows_of(out)


def test_ok_rows_for_torch_and_sdpa_where_cpu_runs_them(packed_run):
    _, rows = packed_run
    ok = {(row["impl"], row["causal"]) for row in rows if row["status"] == "ok"}
    assert ok == {("torch", "True"), ("torch", "False"), ("sdpa", "False"), ("sdpa-math", "False")}


def test_rows_record_the_pack_its_flops_and_what_padding_would_cost(packed_run):
    _, rows = packed_run
    pack = lengths.parse(["uniform:16-64"]).pack(256, seed=0)
    for row in rows:
        assert row["lengths"] == "uniform:16-64" and row["pack"] == ",".join(map(str, pack))
        assert (int(row["batch"]), int(row["seq"])) == (len(pack), max(pack))
        assert float(row["mean_len"]) == pytest.approx(256 / len(pack), rel=1e-5)
    for row in (row for row in rows if row["status"] == "ok"):
        cfg = LayerConfig(dim=32, heads=2, head_dim=16, causal=row["causal"] == "True")
        packed, padded = flops.varlen_flops(registry.get("standard"), cfg, pack, "fwdbwd")
        median = float(row["ms_median"])
        assert float(row["flops"]) == pytest.approx(packed, rel=1e-5) and float(row["flops_padded"]) == pytest.approx(padded, rel=1e-5)
        assert packed < padded  # the drawn lengths differ
        assert float(row["tokens_per_s"]) == pytest.approx(256 / (median * 1e-3), rel=1e-4)
        assert float(row["tflops"]) == pytest.approx(packed / (median * 1e-3) / 1e12, rel=1e-4)
        assert float(row["setup_ms"]) >= 0 and float(row["first_call_ms"]) > 0


def test_unsupported_rows_say_why(packed_run):
    _, rows = packed_run
    why = {(row["impl"], row["causal"]): row["message"] for row in rows if row["status"] == "unsupported"}
    for impl in ("triton", "flex", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"):
        assert why[impl, "True"] == why[impl, "False"] == f"{impl} needs a CUDA device"
    assert "SDPA's math backend refuses is_causal on jagged nested tensors" in why["sdpa", "True"]
    assert "refuses is_causal" in why["sdpa-math", "True"]


def test_the_layer_level_adds_the_projections_and_the_model_level_says_it_has_no_pack(tmp_path):
    out = tmp_path / "run"
    result = invoke("speed", "--attn", "standard", "--impl", "torch", "--lengths", 9, 30, "--level", "kernel", "layer", "model",
                    "--mode", "fwd", "bwd", *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    rows = {(row["level"], row["mode"]): row for row in rows_of(out)}
    for mode in ("fwd", "bwd"):
        kernel, layer = rows["kernel", mode], rows["layer", mode]
        assert kernel["status"] == layer["status"] == "ok" and kernel["pack"] == layer["pack"] == "9,30"
        assert float(layer["flops"]) > float(kernel["flops"]) and float(layer["flops_padded"]) > float(kernel["flops_padded"])
        assert int(layer["params"]) == 32 * (3 * 32) + 32 * 32  # fused qkv and the output projection
        assert rows["model", mode]["status"] == "unsupported"
        assert rows["model", mode]["message"] == "a packed batch is timed at the kernel and layer levels"


def test_a_listed_pack_of_equal_lengths_costs_what_padding_does(tmp_path):
    out = tmp_path / "run"
    assert invoke("speed", "--impl", "torch", "--lengths", 24, 24, 24, "--mode", "fwd", *SMALL, "--out", out).exit_code == 0
    (row,) = rows_of(out)
    assert row["lengths"] == row["pack"] == "24,24,24" and row["flops"] == row["flops_padded"]
    assert json.loads((out / store.META_JSON).read_text())["spec"]["tokens"] is None  # the list is its own size


def test_the_seed_draws_another_pack():
    spec = dict(mechanisms=["standard"], impls=["torch"], levels=["kernel"], modes=["fwd"], dtypes=["fp32"], device="cpu",
                seqs=[], tokens=512, heads=2, head_dim=8, lengths=["uniform:16-64"])
    first, again, other = (sweep.expand(sweep.SweepSpec(**spec, seed=seed))[0] for seed in (0, 0, 1))
    assert first.pack == again.pack != other.pack
    assert sum(first.seq_lengths()) == sum(other.seq_lengths()) == 512


def test_resuming_a_packed_sweep_records_no_case_twice(packed_run, tmp_path):
    out, rows = packed_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in (store.SPEED_CSV, store.META_JSON):
        (copy / name).write_text((out / name).read_text())
    lines = (copy / store.SPEED_CSV).read_text().splitlines(keepends=True)
    (copy / store.SPEED_CSV).write_text("".join(lines[:-3]) + lines[-3][:10])  # two rows lost and a cut line
    result = invoke("speed", "--resume", "--out", copy)
    assert result.exit_code == 0, result.output
    keys = [store.case_key(row) for row in rows_of(copy)]
    assert len(keys) == len(set(keys)) == len(rows)
    assert {store.case_key(row) for row in rows} == set(keys)
    assert json.loads((copy / store.META_JSON).read_text())["spec"]["lengths"] == ["uniform:16-64"]
