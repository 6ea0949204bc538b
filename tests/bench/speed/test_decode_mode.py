"""`attnbench speed --mode decode` through typer's CliRunner: rows with the step's bytes, GB/s and
the cache or state per sequence; unsupported rows with their reasons; bad --context refused in
one line; a resumed decode sweep records nothing twice; whole-sequence modes beside it unchanged."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from attnbench import flops, store
from attnbench.cli import app
from attnbench.models import registry
from attnbench.speed import sweep
from attnbench.tolerance import relative_bound

runner = CliRunner()
SMALL = ["--device", "cpu", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows_of(run_dir):
    with open(run_dir / store.SPEED_CSV, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    """The issue's CPU command, at a small head shape."""
    out = tmp_path_factory.mktemp("decode") / "run"
    result = invoke("speed", "--mode", "decode", "--attn", "standard,linear,deltanet,performer,block",
                    "--context", 128, 512, *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    return out, rows_of(out)


def test_decode_rows_carry_time_bytes_bandwidth_and_memory_per_sequence(decode_run):
    _, rows = decode_run
    ok = [row for row in rows if row["status"] == "ok"]
    assert {(row["mechanism"], row["impl"]) for row in ok} == {
        ("standard", "torch"), ("standard", "sdpa"), ("linear", "torch"), ("deltanet", "torch"), ("performer", "torch"), ("block", "torch")}
    assert len(ok) == 6 * 2  # two contexts each
    for row in ok:
        assert row["mode"] == "decode" and row["queries"] == "1" and row["batch"] == "1" and row["seq"] in ("128", "512")
        median, p20, p80 = float(row["ms_median"]), float(row["ms_p20"]), float(row["ms_p80"])
        assert 0 < p20 <= median <= p80
        assert float(row["tokens_per_s"]) == pytest.approx(1 / (median * 1e-3), rel=1e-4)  # B x N = 1 token a step
        assert int(row["bytes"]) > 0 and float(row["mem_per_seq_mib"]) > 0
        assert float(row["gbps"]) == pytest.approx(int(row["bytes"]) / (median * 1e-3) / 1e9, rel=1e-4)
        assert row["pct_bandwidth"] == "" and row["cuda_graph"] == "False"  # no --measure-peak; CPU
        assert row["flops"] == "" and row["params"] == ""


def test_a_kv_cache_grows_with_the_context_and_a_state_does_not(decode_run):
    _, rows = decode_run
    memory = {(row["mechanism"], row["seq"]): float(row["mem_per_seq_mib"]) for row in rows if row["impl"] == "torch" and row["status"] == "ok"}
    six_digits = {"rel": 1e-5}  # the CSV's floats
    assert memory["standard", "512"] == pytest.approx(4 * memory["standard", "128"], **six_digits)
    assert memory["standard", "128"] == pytest.approx(2 * 128 * 2 * 16 * 4 / 2**20, **six_digits)  # K, V; Hkv = 2, D = 16, fp32
    assert memory["deltanet", "512"] == memory["deltanet", "128"] == pytest.approx(2 * 16 * 16 * 4 / 2**20, **six_digits)  # S [Hkv, D, D] fp32


def test_unsupported_decode_rows_say_why(decode_run):
    _, rows = decode_run
    unsupported = [row for row in rows if row["status"] == "unsupported"]
    assert unsupported and all(row["message"] for row in unsupported)
    on_cuda = {row["impl"] for row in unsupported if "needs a CUDA device" in row["message"]}
    assert {"triton", "triton-paged", "flex", "sdpa-cudnn", "sdpa-flash"} <= on_cuda <= {"triton", "triton-paged", "flex", "sdpa-cudnn", "sdpa-flash", "fla"}
    fla = [row["message"] for row in unsupported if row["impl"] == "fla"]
    assert fla and all("needs a CUDA device" in why or "not installed" in why for why in fla)


def test_a_mechanism_without_a_decode_form_says_so():
    """Every registered mechanism has one now: a copy of block without it stands in."""
    import dataclasses

    spec = sweep.SweepSpec(["block"], ["torch"], ["kernel"], ["decode"], ["fp32"], "cpu", [32], batches=[1], causal=[True], contexts=[40])
    (case,) = sweep.expand(spec)
    assert "has no decode step" in sweep.why_unsupported(case, dataclasses.replace(registry.get("block"), decode=None))


def test_resuming_a_decode_sweep_records_no_case_twice(decode_run, tmp_path):
    out, rows = decode_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in (store.SPEED_CSV, store.META_JSON):
        (copy / name).write_text((out / name).read_text())
    lines = (copy / store.SPEED_CSV).read_text().splitlines(keepends=True)
    (copy / store.SPEED_CSV).write_text("".join(lines[:-3]) + lines[-3][:10])  # two rows lost and a cut line
    result = invoke("speed", "--resume", "--out", copy)
    assert result.exit_code == 0, result.output
    resumed = rows_of(copy)
    keys = [store.case_key(row) for row in resumed]
    assert len(keys) == len(set(keys)) == len(rows)
    assert {store.case_key(row) for row in rows} == set(keys)
    assert json.loads((copy / store.META_JSON).read_text())["spec"]["contexts"] == [128, 512]


@pytest.mark.parametrize("context", ["0", "-4"])
def test_a_context_that_is_not_positive_is_one_line_exit_2(context, tmp_path):
    result = invoke("speed", "--mode", "decode", "--context", context, *SMALL, "--out", tmp_path / "run")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == f"error: --context must be positive, got {context}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--mode", "decode"], "--mode decode needs --context"),
    (["--mode", "fwd", "--context", "64"], "add decode to --mode"),
    (["--mode", "decode", "--context", "4", "--queries", "8"], "--context 4 is less than --queries 8"),
])
def test_decode_options_that_do_not_fit_are_refused(args, message, tmp_path):
    result = invoke("speed", *args, *SMALL, "--out", tmp_path / "run")
    assert result.exit_code == 2 and message in result.output, result.output


def test_whole_sequence_modes_beside_decode_keep_their_rows():
    spec = sweep.SweepSpec(["standard"], ["torch"], ["kernel"], ["fwd", "bwd", "decode"], ["fp32"], "cpu", [32],
                           batches=[2], heads=4, head_dim=16, contexts=[64, 128], queries=2)
    cases = sweep.expand(spec)
    whole = [case for case in cases if case.mode != "decode"]
    assert [(c.mode, c.seq, c.batch, c.queries) for c in whole] == [("fwd", 32, 2, None), ("bwd", 32, 2, None)]
    decode = [case for case in cases if case.mode == "decode"]
    assert [(c.seq, c.batch, c.queries) for c in decode] == [(64, 2, 2), (128, 2, 2)]
    rows = sweep.Sweep(cases, lambda row: None).run()
    assert {row["status"] for row in rows} == {"ok"}
    fwd = next(row for row in rows if row["mode"] == "fwd")
    assert fwd["bytes"] is None and fwd["flops"] > 0 and fwd["tokens_per_s"] == pytest.approx(2 * 32 / (fwd["ms_median"] * 1e-3))
    step = next(row for row in rows if row["mode"] == "decode")
    assert step["tokens_per_s"] == pytest.approx(2 * 2 / (step["ms_median"] * 1e-3))  # B x N


def test_decode_rows_get_percent_of_the_measured_copy_bandwidth():
    spec = sweep.SweepSpec(["linear"], ["torch"], ["kernel"], ["decode"], ["fp32"], "cpu", [32], batches=[1],
                           heads=4, head_dim=16, contexts=[64])
    (row,) = sweep.Sweep(sweep.expand(spec), lambda row: None, copy_gbps=50.0).run()
    assert row["pct_bandwidth"] == pytest.approx(100 * row["gbps"] / 50.0)
    cfg = sweep.expand(spec)[0].layer_config()
    assert row["bytes"] == flops.decode_bytes(registry.get("linear"), cfg, 1, 64, 1, 4)


def test_a_bidirectional_or_model_graph_decode_step_is_unsupported_with_its_reason():
    spec = sweep.SweepSpec(["standard"], ["torch"], ["layer"], ["decode"], ["fp32"], "cpu", [32], batches=[1],
                           heads=4, head_dim=16, causal=[True, False], contexts=[64])
    for level in ("kernel", "layer"):
        at_level = sweep.SweepSpec(**{**spec.__dict__, "levels": [level]})
        reasons = {case.causal: sweep.why_unsupported(case, registry.get("standard")) for case in sweep.expand(at_level)}
        assert reasons[True] is None and "causal" in reasons[False], level
    graph = sweep.SweepSpec(**{**spec.__dict__, "levels": ["model-graph"], "causal": [True]})
    assert all("needs a CUDA device" in sweep.why_unsupported(case, registry.get("standard")) for case in sweep.expand(graph))


def test_a_model_graph_decode_step_is_captured_only_where_the_step_holds_no_host_synchronisation():
    spec = sweep.SweepSpec(["standard", "linear", "bsbr"], ["torch"], ["model-graph"], ["decode"], ["bf16"], "cuda", [32], batches=[1],
                           causal=[True], contexts=[64], preset="tiny")
    reasons = {case.mechanism: sweep.why_unsupported(case, registry.get(case.mechanism)) for case in sweep.expand(spec)}
    assert "synchronisation" in reasons["standard"] and "time triton" in reasons["standard"]
    assert "synchronisation" in reasons["bsbr"] and "chunk" in reasons["bsbr"]  # its state holds the chunk's KV cache
    assert reasons["linear"] is None  # a state's torch steps read nothing back on the host
    rope = sweep.SweepSpec(**{**spec.__dict__, "mechanisms": ["rope"], "impls": ["triton"], "window": 16})
    (case,) = sweep.expand(rope)
    assert "RoPE tables" in sweep._why_no_graph(case, registry.get("rope"))  # why_unsupported says first that no GPU is here


def test_the_layer_level_decode_step_is_one_layer_with_its_cache(tmp_path):
    out = tmp_path / "run"
    result = invoke("speed", "--mode", "decode", "--level", "layer", "--attn", "standard,linear,gau", "--impl", "torch,triton",
                    "--context", 32, "--device", "cpu", "--heads", 4, "--head-dim", 16, "--out", out)  # no GQA: gau takes none
    assert result.exit_code == 0, result.output
    rows = {(r["mechanism"], r["impl"]): r for r in rows_of(out)}
    for mechanism in ("standard", "linear", "gau"):  # gau: a layer without a fused qkv projection
        row = rows[mechanism, "torch"]
        assert row["status"] == "ok" and row["level"] == "layer" and float(row["mem_per_seq_mib"]) > 0 and int(row["params"]) > 0
    for mechanism in ("standard", "linear"):  # CPU: our kernels need CUDA (run under the interpreter in test_the_fused_state_steps_...)
        assert rows[mechanism, "triton"]["status"] == "unsupported" and "needs a CUDA device" in rows[mechanism, "triton"]["message"]


def test_report_on_a_decode_run_draws_time_per_step_with_the_bandwidth_bound(decode_run, tmp_path):
    from attnbench.report.decode import bound_ms
    from attnbench.report.speed import load_speed

    out, _ = decode_run
    assert invoke("report", out, "--out", tmp_path / "plain").exit_code == 0
    assert [p.name for p in (tmp_path / "plain" / "plots").glob("decode-*.png")]
    assert bound_ms(load_speed([out])).empty  # no bandwidth measured: no bound drawn
    measured = tmp_path / "measured"
    measured.mkdir()
    (measured / store.META_JSON).write_text((out / store.META_JSON).read_text())
    rows = rows_of(out)
    for row in rows:  # as a run with --measure-peak at 10 GB/s would have recorded
        row["pct_bandwidth"] = f"{10 * float(row['gbps']):.6g}" if row["gbps"] else ""
    with open(measured / store.SPEED_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=store.SPEED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    bound = bound_ms(load_speed([measured]))
    assert bound["standard", 1, 128] == pytest.approx(next(
        int(r["bytes"]) for r in rows if r["mechanism"] == "standard" and r["seq"] == "128" and r["bytes"]) / 10e9 * 1e3, rel=1e-4)
    result = invoke("report", measured)
    assert result.exit_code == 0 and "the bandwidth bound" in (measured / "report.md").read_text()


def test_report_fits_the_exponent_of_decode_time_in_the_context(tmp_path):
    """Three contexts or more: the scaling exponent is fitted for decode rows too (its figure
    once failed on them with no row for the mode)."""
    out = tmp_path / "run"
    assert invoke("speed", "--mode", "decode", "--attn", "standard", "--impl", "torch", "--context", 64, 128, 256, *SMALL,
                  "--out", out).exit_code == 0
    result = invoke("report", out, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "report" / "plots").glob("exponent-*.png")]


def test_the_model_level_decode_step_runs_the_whole_preset_model(tmp_path):
    """--level model: one token through the tiny GPT against every layer's cache or state; the
    impls whose steps run at the kernel level only say why."""
    out = tmp_path / "run"
    result = invoke("speed", "--mode", "decode", "--level", "model", "--preset", "tiny", "--device", "cpu",
                    "--attn", "standard,linear,block,learned", "--impl", "torch,sdpa", "--context", 32, 64, "--batch", 2, "--out", out)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    ok = {(r["mechanism"], r["seq"]): r for r in rows if r["status"] == "ok"}
    assert set(ok) == {(m, s) for m in ("standard", "linear", "block", "learned") for s in ("32", "64")}
    from attnbench.models.presets import Preset

    layers = Preset.from_name("tiny").layers
    for (mechanism, seq), row in ok.items():
        assert row["impl"] == "torch" and row["level"] == "model" and float(row["tokens_per_s"]) > 0
        per_layer = registry.get(mechanism).decode.memory(
            registry.LayerConfig(dim=64, heads=int(row["heads"]), kv_heads=int(row["kv_heads"]), head_dim=int(row["head_dim"]), causal=True),
            int(seq), 1, 4) / 2**20
        assert float(row["mem_per_seq_mib"]) == pytest.approx(layers * per_layer, rel=1e-4)
    assert float(ok["standard", "64"]["mem_per_seq_mib"]) == pytest.approx(2 * float(ok["standard", "32"]["mem_per_seq_mib"]), rel=1e-3)
    reasons = {(r["mechanism"], r["impl"]): r["message"] for r in rows if r["status"] == "unsupported"}
    assert "time sdpa at --level kernel" in reasons["standard", "sdpa"]


@pytest.mark.parametrize("level", ["kernel", "layer", "model"])
def test_the_sparse_mechanisms_decode_at_every_level(level, tmp_path):
    """bsbr (a chunk-level state whose summaries grow a chunk at a time) and nsa (a KV cache plus block
    means): ok rows with the step's bytes (kernel level) and memory per sequence that grows with L."""
    out = tmp_path / "run"
    result = invoke("speed", "--mode", "decode", "--level", level, "--preset", "tiny", "--attn", "bsbr,nsa", "--impl", "torch",
                    "--context", 128, 512, "--batch", 2, *SMALL, "--option", "chunk=64", "--option", "block=16", "--out", out)
    assert result.exit_code == 0, result.output
    rows = {(r["mechanism"], r["seq"]): r for r in rows_of(out)}
    assert set(rows) == {(m, s) for m in ("bsbr", "nsa") for s in ("128", "512")}
    for row in rows.values():
        assert row["status"] == "ok", row["message"]
        assert row["level"] == level and float(row["tokens_per_s"]) > 0 and float(row["mem_per_seq_mib"]) > 0
        assert (int(row["bytes"]) > 0) if level == "kernel" else row["bytes"] == ""
    for mechanism in ("bsbr", "nsa"):
        assert float(rows[mechanism, "512"]["mem_per_seq_mib"]) > float(rows[mechanism, "128"]["mem_per_seq_mib"])


@pytest.mark.parametrize("level", ["layer", "model"])
@pytest.mark.parametrize("mechanism, kernel_name", [("linear", "linear_step"), ("deltanet", "deltanet_step")])
def test_the_fused_state_steps_run_the_layer_and_model_level_triton_decode_step(mechanism, kernel_name, level, monkeypatch):
    """impl triton at the layer and model levels: the state caches step by our fused kernels (on a
    CPU under TRITON_INTERPRET, the workload built past the CUDA check, which the row keeps as the
    kernel impl's own reason) and give the torch impl's output from the same random state."""
    from attnbench.kernels import state_decode as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    kernel = getattr(kernels, kernel_name)
    monkeypatch.setattr(kernels, kernel_name, lambda *args: calls.append(1) or kernel(*args))
    spec = sweep.SweepSpec([mechanism], ["triton", "torch"], [level], ["decode"], ["fp32"], device, [32], batches=[2],
                           heads=4, kv_heads=2, head_dim=16, contexts=[16], preset="tiny")  # GQA at the layer level
    cases = {case.impl: case for case in sweep.expand(spec)}
    triton = cases["triton"]
    impl = registry.get(mechanism).decode.impls["triton"]
    assert sweep.why_unsupported(triton, registry.get(mechanism)) == impl.why_not(triton.layer_config(), 1, device, torch.float32)
    outputs = {}
    for name, case in cases.items():
        calls.clear()
        torch.manual_seed(0)  # the same layer or model and the same random state for both impls
        outputs[name] = sweep.decode_workload(case, graphed=False).forward()
        assert bool(calls) == (name == "triton"), f"{name}: fused kernel calls {len(calls)}"
    error = (outputs["triton"] - outputs["torch"]).abs().max().item()
    bound = relative_bound(1e-5, outputs["torch"].abs().max().item())  # float32: the same terms in another order
    assert error <= bound, f"max error {error:.3g} > bound {bound:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("mechanism, impl", [("standard", "triton"), ("linear", "torch"), ("deltanet", "torch"),
                                             ("linear", "triton"), ("deltanet", "triton")])
def test_a_model_graph_decode_step_replays_on_a_gpu(mechanism, impl):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = sweep.SweepSpec([mechanism], [impl], ["model-graph"], ["decode"], ["bf16"], "cuda", [32], batches=[2],
                           causal=[True], contexts=[40], preset="tiny")
    (case,) = sweep.expand(spec)
    assert sweep.why_unsupported(case, registry.get(mechanism)) is None
    work = sweep.decode_workload(case, graphed=True)
    work.forward()
    work.forward()  # a replay
    torch.cuda.synchronize()
    assert work.cuda_graph and not work.peak_memory
