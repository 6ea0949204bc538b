"""The sweep on the torch impl: warm-up before timing, rows, unsupported, errors, OOM and skips."""

import math

import pytest
import torch

from attnbench import store, timing
from attnbench.speed import sweep
from attnbench.errors import InputError
from attnbench.speed.sweep import Sweep, SweepSpec


def tiny_spec(**overrides):
    spec = dict(mechanisms=["standard"], impls=["torch"], levels=["kernel"], modes=["fwd"], dtypes=["fp32"],
                device="cpu", seqs=[8, 16], batches=[2], heads=2, head_dim=8, causal=[True])
    return SweepSpec(**{**spec, **overrides})


def run(spec, **kwargs):
    rows = []
    events = []
    Sweep(sweep.expand(spec), rows.append, **kwargs).run(lambda phase, case: events.append((phase, case)))
    return rows, events


@pytest.mark.parametrize("level", ["kernel", "layer"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwdbwd"])
def test_torch_impl_gives_ok_rows_with_consistent_numbers(level, mode):
    spec = tiny_spec(levels=[level], modes=[mode], kv_heads=1, heads=2, seqs=[8])
    (r,), _ = run(spec)
    assert r["status"] == "ok", r["message"]
    assert 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
    assert r["first_call_ms"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * 8 / (r["ms_median"] * 1e-3))
    assert r["tflops"] == pytest.approx(r["flops"] / (r["ms_median"] * 1e-3) / 1e12)
    c = 2 * 8
    assert r["params"] == c * (2 + 2 * 1) * 8 + c * c  # fused qkv (Hq + 2 Hkv) * D outputs + out projection
    assert r["peak_mem_mib"] is None and r["pct_peak"] is None  # CPU: no allocator stats, no peak measured


def test_each_series_is_warmed_up_before_it_is_timed(monkeypatch):
    calls = []
    first_call, measure = timing.first_call_ms, timing.measure
    monkeypatch.setattr(timing, "first_call_ms", lambda fn, dev: calls.append("first") or first_call(fn, dev))
    monkeypatch.setattr(timing, "measure", lambda *a, **k: calls.append("timed") or measure(*a, **k))
    rows, events = run(tiny_spec(modes=["fwd", "bwd"]))  # two series (fwd, bwd) of two lengths
    assert calls == ["first", "first", "timed", "timed"] * 2
    assert [phase for phase, _ in events] == ["warmup", "warmup", "timing", "timing"] * 2
    assert {r["status"] for r in rows} == {"ok"}


def test_a_sweep_stopped_in_its_second_series_keeps_the_first(monkeypatch):
    measure, timed = timing.measure, []

    def stopped_at_the_third(*args, **kwargs):
        timed.append(1)
        if len(timed) == 3:
            raise KeyboardInterrupt  # what a time limit's signal does to the sweep
        return measure(*args, **kwargs)

    monkeypatch.setattr(timing, "measure", stopped_at_the_third)
    written = []
    spec = tiny_spec(modes=["fwd", "bwd"])
    with pytest.raises(KeyboardInterrupt):
        sweep.Sweep(sweep.expand(spec), written.append).run()
    assert [(r["mode"], r["status"]) for r in written] == [("fwd", "ok"), ("fwd", "ok")]


def test_bwd_resets_input_grads_every_repetition(monkeypatch):
    seen = {}
    measure = timing.measure

    def spy(fn, device, grad_to_none=()):
        seen["leaves"] = list(grad_to_none)
        return measure(fn, device, grad_to_none)

    monkeypatch.setattr(timing, "measure", spy)
    run(tiny_spec(modes=["bwd"], seqs=[8]))
    shapes = [tuple(t.shape) for t in seen["leaves"]]
    assert shapes[:3] == [(2, 8, 2, 8)] * 3  # q, k, v [B, T, H, D], then the layer's parameters
    assert all(t.grad is None or t.requires_grad for t in seen["leaves"])


def test_cuda_only_impls_are_unsupported_rows_with_the_reason():
    rows, _ = run(tiny_spec(impls=["triton", "sdpa-flash", "torch"], seqs=[8]))
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["torch"]["status"] == "ok"
    for impl in ("triton", "sdpa-flash"):
        assert by_impl[impl]["status"] == "unsupported"
        assert "CUDA" in by_impl[impl]["message"]


def failing_level(exc_at_seq, exc):
    """The kernel level, raising ``exc`` when the case's seq >= exc_at_seq (and its impl is torch)."""
    real = sweep.kernel_workload

    def build(case):
        if case.impl == "torch" and case.seq >= exc_at_seq:
            raise exc
        return real(case)

    return build


def test_oom_is_a_row_and_skips_the_larger_sizes(monkeypatch):
    monkeypatch.setitem(sweep.LEVELS, "kernel", failing_level(16, torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    rows, _ = run(tiny_spec(impls=["torch", "sdpa"], seqs=[8, 16, 32, 64], batches=[1, 2]))
    status = {(r["impl"], r["seq"], r["batch"]): r["status"] for r in rows}
    assert status[("torch", 8, 1)] == status[("torch", 8, 2)] == "ok"
    assert status[("torch", 16, 1)] == "oom"
    assert status[("torch", 16, 2)] == status[("torch", 32, 1)] == status[("torch", 64, 2)] == "skipped"
    assert all(s == "ok" for (impl, _, _), s in status.items() if impl == "sdpa")  # other series untouched
    assert len(rows) == 16


def test_under_a_token_budget_an_oom_skips_every_longer_seq(monkeypatch):
    monkeypatch.setitem(sweep.LEVELS, "kernel", failing_level(16, torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    spec = tiny_spec(batches=None, tokens=64, seqs=[8, 16, 32, 64])  # B = 8, 4, 2, 1: fewer as T grows
    rows, _ = run(spec, larger=spec.larger)
    assert [(r["seq"], r["batch"], r["status"]) for r in rows] == [(16, 4, "oom"), (32, 2, "skipped"), (64, 1, "skipped"), (8, 8, "ok")]


def test_an_error_in_one_impl_never_stops_the_sweep(monkeypatch):
    monkeypatch.setitem(sweep.LEVELS, "kernel", failing_level(0, RuntimeError("kernel exploded\nsecond line")))
    rows, _ = run(tiny_spec(impls=["torch", "sdpa"]))
    torch_rows = [r for r in rows if r["impl"] == "torch"]
    assert [r["status"] for r in torch_rows] == ["error", "error"]
    assert torch_rows[0]["message"] == "RuntimeError: kernel exploded"
    assert [r["status"] for r in rows if r["impl"] == "sdpa"] == ["ok", "ok"]


def test_recorded_cases_are_not_run_again_and_recorded_ooms_still_skip():
    spec = tiny_spec(seqs=[8, 16, 32])
    cases = sweep.expand(spec)
    done = {**vars(cases[0]), "status": "ok"}
    oom = {k: store.format_value(v) for k, v in {**vars(cases[1]), "status": "oom"}.items()}
    rows, events = run(spec, recorded=store.recorded_keys([done, oom]), prior_stops=sweep.stops_in([oom], None))
    assert [(r["seq"], r["status"]) for r in rows] == [(32, "skipped")]
    assert len(events) == 2  # one pending case, warm-up and timing


def test_a_case_slower_than_max_call_ms_skips_the_larger_sizes(monkeypatch):
    monkeypatch.setattr(sweep.timing, "measure", lambda call, device, grad_to_none=(): sweep.timing.Timing(5.0, 4.0, 6.0))
    spec = tiny_spec(seqs=[8, 16, 32])
    rows, _ = run(spec, max_call_ms=3.0)
    assert [(r["seq"], r["status"]) for r in rows] == [(8, "ok"), (16, "skipped"), (32, "skipped")]
    assert rows[1]["message"] == "a smaller size took 5 ms per call (over --max-call-ms 3)"
    assert [r["status"] for r in run(spec, max_call_ms=None)[0]] == ["ok", "ok", "ok"]


def test_on_resume_a_recorded_slow_case_still_skips():
    spec = tiny_spec(seqs=[8, 16])
    slow = {k: store.format_value(v) for k, v in {**vars(sweep.expand(spec)[0]), "status": "ok", "ms_median": 9.0}.items()}
    assert list(sweep.stops_in([slow], max_call_ms=10.0)) == []
    rows, _ = run(spec, recorded=store.recorded_keys([slow]), prior_stops=sweep.stops_in([slow], 3.0))
    assert [(r["seq"], r["status"]) for r in rows] == [(16, "skipped")]


def test_tokens_budget_derives_the_batch_per_seq():
    cases = sweep.expand(tiny_spec(batches=None, tokens=64, seqs=[8, 32, 128]))
    assert [(c.seq, c.batch) for c in cases] == [(8, 8), (32, 2), (128, 1)]


def test_a_mechanism_default_window_is_recorded():
    (case,) = sweep.expand(tiny_spec(mechanisms=["window"], seqs=[8]))
    assert case.window == 1024
    (case,) = sweep.expand(tiny_spec(mechanisms=["window"], seqs=[8], window=4))
    assert case.window == 4


@pytest.mark.parametrize("overrides, match", [
    (dict(mechanisms=["nope"]), "valid: .*standard"),
    (dict(impls=["cutlass"]), "unknown impl 'cutlass'.*valid: .*sdpa"),
    (dict(seqs=[8, 0]), "--seq must be positive"),
    (dict(heads=4, kv_heads=3), "multiple of --kv-heads"),
    (dict(modes=["sideways"]), "unknown mode"),
    (dict(device="tpu"), "device"),
    (dict(max_call_ms=-1.0), "--max-call-ms must be >= 0"),
])
def test_bad_specs_are_input_errors(overrides, match):
    with pytest.raises((InputError, ValueError), match=match):
        sweep.validate(tiny_spec(**overrides))


def test_a_dtype_the_device_cannot_compute_is_an_input_error(monkeypatch):
    real = torch.ones

    def no_half(*args, dtype=None, **kwargs):
        if dtype == torch.float16:
            raise RuntimeError('"addmm" not implemented for \'Half\'')
        return real(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "ones", no_half)
    with pytest.raises(InputError, match="cannot compute in fp16"):
        sweep.check_device("cpu", ["fp32", "fp16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_an_input_error():
    with pytest.raises(InputError, match="no CUDA device"):
        sweep.check_device("cuda", ["bf16"])


@pytest.mark.cuda
def test_cuda_rows_carry_peak_memory_and_percent_of_peak():
    spec = tiny_spec(device="cuda", dtypes=["bf16"], impls=["torch", "sdpa"], seqs=[256], modes=["fwd", "bwd"])
    rows, _ = run(spec, peaks={"bf16": 100.0})
    for r in rows:
        assert r["status"] == "ok", r["message"]
        assert r["peak_mem_mib"] > 0
        assert math.isclose(r["pct_peak"], r["tflops"])  # peak 100 TFLOP/s: percent == TFLOP/s


def test_model_level_times_a_training_step_of_the_preset(monkeypatch):
    steps = []
    from attnbench.models import transformer

    step = transformer.training_step
    monkeypatch.setattr(transformer, "training_step", lambda *a: steps.append(1) or step(*a))
    spec = tiny_spec(levels=["model"], modes=["fwd", "bwd", "fwdbwd"], seqs=[16], preset="tiny")
    rows, _ = run(spec)
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["bwd"]["status"] == "unsupported"
    fwd, fwdbwd = by_mode["fwd"], by_mode["fwdbwd"]
    assert fwd["status"] == fwdbwd["status"] == "ok", (fwd["message"], fwdbwd["message"])
    assert steps, "fwdbwd did not run the optimizer step"
    from attnbench.models.presets import Preset

    tiny = Preset.from_name("tiny")
    assert (fwd["preset"], fwd["heads"], fwd["head_dim"]) == ("tiny", tiny.heads, tiny.dim // tiny.heads)
    assert 3 * fwd["flops"] < fwdbwd["flops"] < 3.5 * fwd["flops"]  # matmuls 3x, attention core 3.5x the forward
    assert fwd["params"] > 100_000  # the whole model, embeddings included


def test_model_graph_level_needs_cuda_and_takes_the_presets_shape():
    rows, _ = run(tiny_spec(levels=["model-graph"], modes=["fwdbwd"], seqs=[16], preset="tiny"))
    (row,) = rows
    assert (row["status"], row["preset"]) == ("unsupported", "tiny")
    assert "needs a CUDA device" in row["message"]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "sdpa"])
def test_model_graph_replays_the_training_step(impl):
    """The replay runs the whole step (parameters move, each replay again), and the sweep times it."""
    spec = tiny_spec(levels=["model-graph"], modes=["fwd", "fwdbwd"], seqs=[128], preset="tiny", device="cuda",
                     dtypes=["bf16"], impls=[impl])
    case = next(case for case in sweep.expand(spec) if case.mode == "fwdbwd")
    work = sweep.LEVELS["model-graph"](case)
    weight = work.leaves[0]
    before = weight.detach().clone()
    work.step()
    after_one = weight.detach().clone()
    work.step()
    torch.cuda.synchronize()
    assert not torch.equal(before, after_one) and not torch.equal(after_one, weight), "a replay is an optimizer step"
    rows, _ = run(spec)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["message"] for r in rows]
    assert [r["peak_mem_mib"] for r in rows] == [None, None], "a replay allocates nothing: no peak to report"


def test_every_mechanisms_references_come_after_all_other_impls():
    cases = sweep.expand(tiny_spec(mechanisms=["standard", "linear"], impls=None, seqs=[8, 16]))
    impls = [(c.mechanism, c.impl) for c in cases]
    first_reference = next(i for i, c in enumerate(cases) if c.impl == "torch")
    assert all(c.impl == "torch" for c in cases[first_reference:])
    assert ("linear", "chunked") in impls[:first_reference]  # the second mechanism's fast impl before any reference
    assert [m for m, i in impls[first_reference:]] == ["standard"] * 2 + ["linear"] * 2  # mechanism order kept
    assert [c.seq for c in cases if (c.mechanism, c.impl) == ("standard", "sdpa")] == [8, 16]  # sizes still ascending


def test_a_token_budget_below_one_sequence_is_an_input_error():
    with pytest.raises(InputError, match=r"^--tokens 100 is less than one sequence of --seq 512 .*--batch"):
        sweep.check_token_budget(100, [64, 512, 128])
    sweep.check_token_budget(512, [64, 512])  # B = 1 at the longest: the budget holds


def test_a_sweep_where_nothing_can_run_is_an_input_error():
    with pytest.raises(InputError, match=r"^nothing in this sweep can run here .*triton: triton needs a CUDA device"):
        sweep.validate(tiny_spec(impls=["triton"]))
    sweep.validate(tiny_spec(impls=["triton", "torch"]))  # one impl that runs is enough
