"""bench/devtools/check.py on the CPU: the no-CUDA error, and the measuring/table logic on fake cases."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from attnbench.devtools import check
from attnbench.cli import app
from attnbench.errors import InputError
from attnbench.kernels import reference
from attnbench.tolerance import FP32_NOISE, error_bound, relative_bound


def _inputs(generator: torch.Generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    return randn(1, 33, 2, 16), randn(1, 33, 1, 16), randn(1, 33, 1, 16), randn(1, 33, 2, 16)


def _attention(q, k, v):
    return reference.attention(q, k, v, causal=True)


def _attention_in_fp32(q, k, v):
    """A good 'kernel': computes in float32 and rounds once, so it beats torch in bf16."""
    return _attention(q.float(), k.float(), v.float()).to(q.dtype)


def _attention_with_bias(q, k, v):
    return _attention(q, k, v) + 0.05


def _fake_case(name, kernel):
    return check.CheckCase(name, kernel, _attention, _inputs, device="cpu")


def test_a_kernel_as_precise_as_float32_passes_every_output():
    rows = check.run_cases([_fake_case("good", _attention_in_fp32)])
    assert [row.output for row in rows] == ["o", "dq", "dk", "dv"]
    assert all(row.status == "ok" for row in rows), rows
    assert all(0 < row.torch_error and row.ratio < 2 for row in rows), rows
    assert check.passed(rows)


def test_an_output_off_by_more_than_twice_torchs_error_fails_only_that_output():
    rows = {row.output: row for row in check.run_cases([_fake_case("biased", _attention_with_bias)])}
    assert rows["o"].status == "fail" and rows["o"].ratio > 2
    assert rows["o"].kernel_error == pytest.approx(0.05, abs=0.01)  # the bias plus bf16 rounding
    assert {rows[name].status for name in ("dq", "dk", "dv")} == {"ok"}  # a constant shift has the same gradients
    assert not check.passed(list(rows.values()))


def test_a_kernel_that_raises_is_a_failed_row_and_the_check_goes_on():
    def broken(q, k, v):
        raise RuntimeError("no kernel image")

    rows = check.run_cases([_fake_case("broken", broken), _fake_case("good", _attention_in_fp32)])
    assert rows[0].case == "broken" and rows[0].status == "error" and "no kernel image" in rows[0].message
    assert [row.status for row in rows[1:]] == ["ok"] * 4
    assert not check.passed(rows)


def test_table_shows_errors_ratios_and_results():
    rows = check.run_cases([_fake_case("good", _attention_in_fp32), _fake_case("biased", _attention_with_bias)])
    text = io.StringIO()
    Console(file=text, width=200).print(check.table(rows))
    lines = text.getvalue().splitlines()
    biased_o = next(line for line in lines if "biased" in line and " o " in line)
    assert "FAIL" in biased_o and f"{rows[4].ratio:.2f}" in biased_o
    assert sum(" pass " in line for line in lines) == 7


def test_error_bound_is_twice_torchs_error_plus_half_an_ulp():
    assert error_bound(0.01, 4.0, torch.bfloat16) == pytest.approx(0.02 + 2.0**-7 * 4.0 / 2 + 4.0 * FP32_NOISE)


def test_every_bound_has_a_floor_where_the_exact_answer_is_0():
    assert error_bound(0.0, 0.0, torch.bfloat16) == FP32_NOISE
    assert relative_bound(1e-4, 0.0) == FP32_NOISE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_check_is_one_input_error_line_and_exit_2():
    with pytest.raises(InputError, match="CUDA"):
        check.run_check(["standard"], 1024, "bf16")
    result = CliRunner().invoke(app, ["check", "--attn", "standard"])
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.output and "Traceback" not in result.output


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="dtype"):
        check.run_check(["standard"], 1024, "fp8")
    with pytest.raises(InputError, match="max-seq"):
        check.run_check(["standard"], 0, "bf16")


def test_softmax_matrix_covers_lengths_and_both_masks():
    assert check._seq_lengths(16384) == [1024, 1037, 4096, 16384]
    assert check._seq_lengths(512) == [512]
    assert check._heads_for(1, 1024) == 8 and check._heads_for(2, 16384) == 2


@pytest.mark.cuda
def test_check_passes_on_the_gpu_at_moderate_sizes():
    rows = check.run_cases(check.mechanism_cases(["standard", "rope", "alibi", "window"], 2048, torch.bfloat16))
    assert check.passed(rows), [row for row in rows if row.status != "ok"]


def test_check_csv_holds_every_row_as_printed(monkeypatch, tmp_path):
    cases = [_fake_case("good", _attention_in_fp32), _fake_case("biased", _attention_with_bias)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the fake cases run on the CPU
    monkeypatch.setattr(check, "mechanism_cases", lambda *args, **kwargs: cases)
    path = tmp_path / "out" / "check.csv"
    ok = check.run_check(["standard"], 64, "bf16", Console(file=io.StringIO()), path)
    rows = pd.read_csv(path)
    assert not ok and len(rows) == 8 and list(rows.columns) == check.CHECK_COLUMNS
    failed = rows[rows["status"] == "fail"]
    assert list(zip(failed["case"], failed["output"])) == [("biased", "o")] and (failed["ratio"] > 2).all()


def test_the_gate_checks_every_cpu_impl_of_every_scheme_and_names_what_it_cannot(tmp_path):
    """On the CPU at a small size: linear and standard with rope and alibi; linear x alibi is a row
    of status unsupported with its reason, the rest pass against the float64 definition."""
    path = tmp_path / "check.csv"
    ok = check.run_check(["standard", "linear"], 40, "bf16", Console(file=io.StringIO()), path, positions=["rope", "alibi"], device="cpu")
    rows = pd.read_csv(path, keep_default_na=False)
    assert ok
    ran = rows[rows["status"] == "ok"]
    assert {case.split(" ")[0] for case in ran["case"]} >= {"standard+rope/sdpa", "standard+alibi/sdpa", "linear+rope/chunked"}
    assert set(ran["output"]) == {"o", "dq", "dk", "dv"}
    refused = rows[rows["case"].str.startswith("linear+alibi/")]
    assert len(refused) and (refused["status"] == "unsupported").all() and refused["message"].str.contains("no score matrix").all()


def test_a_wrong_impl_fails_the_gate(monkeypatch):
    """An impl off by a small bias in its output fails, also when the definition is right."""
    import dataclasses

    from attnbench.models import registry

    mechanism = registry.get("linear")
    right = mechanism.impls["chunked"]
    monkeypatch.setitem(mechanism.impls, "chunked", dataclasses.replace(right, run=lambda *a, **k: right.run(*a, **k) + 0.05))
    cases = check.mechanism_cases(["linear"], 40, torch.bfloat16, impls=["chunked"], device="cpu")
    assert not check.passed(check.run_cases(cases))


def test_padded_queries_that_see_no_key_are_not_compared():
    """bidirectional, window 4, key padding 48 of 64: queries 53..63 of the padded sequence see no
    key at all (impls differ on an empty softmax); what a model reads, the valid rows, is compared."""
    cases = [c for c in check.mechanism_cases(["window"], 64, torch.bfloat16, impls=["sdpa", "sdpa-math"], window=4, device="cpu")
             if "bidir" in c.name]
    assert cases and all(not c.unsupported for c in cases)
    assert check.passed(check.run_cases(cases))


def test_an_impl_that_takes_no_key_padding_is_unsupported_on_padded_cases():
    from attnbench.models import registry

    standard = registry.get("standard")
    cfg = registry.LayerConfig(dim=64, heads=4, impl="sdpa-flash", causal=False)
    assert check.why_not(standard, None, cfg, "cuda", torch.bfloat16, padded=True) == "the flash backend takes no mask (key padding)"
    gqa = registry.LayerConfig(dim=64, heads=4, kv_heads=2, impl="sdpa-efficient")
    assert "takes no GQA" in standard.impls["sdpa-efficient"].unsupported(gqa, torch.device("cuda"), torch.bfloat16)
