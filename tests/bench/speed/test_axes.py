"""`speed --positions` and `--option`: position schemes and mechanism options are case columns;
a cell without meaning is an unsupported row with its reason; options reach only the mechanisms
that declare them and change what is timed."""

import pytest

from attnbench.case import Case, option_text
from attnbench.errors import InputError
from attnbench.models.errors import UnknownNameError
from attnbench.speed import sweep
from attnbench.speed.sweep import Sweep, SweepSpec
from attnbench.store import format_value


def spec(**overrides):
    base = dict(mechanisms=["standard", "linear"], impls=["torch"], levels=["kernel"], modes=["fwd"], dtypes=["fp32"],
                device="cpu", seqs=[16], batches=[1], heads=2, head_dim=8, causal=[True])
    return SweepSpec(**{**base, **overrides})


def rows_of(s):
    rows = []
    Sweep(sweep.expand(s), rows.append).run()
    return {(r["mechanism"], r["positions"], r["level"]): r for r in rows}


def test_every_scheme_crosses_every_mechanism_and_the_meaningless_cells_say_why():
    rows = rows_of(spec(positions=["rope", "alibi", "learned"]))
    assert rows[("standard", "rope", "kernel")]["status"] == "ok" and rows[("linear", "rope", "kernel")]["status"] == "ok"
    assert rows[("standard", "alibi", "kernel")]["status"] == "ok"
    assert rows[("linear", "alibi", "kernel")]["status"] == "unsupported"
    assert "no score matrix" in rows[("linear", "alibi", "kernel")]["message"]
    assert "time them at --level model" in rows[("standard", "learned", "kernel")]["message"]


def test_a_scheme_changes_the_kernel_that_is_timed():
    """rope rotates q and k inside the layer's core: its case builds a layer whose config says so."""
    (case,) = [c for c in sweep.expand(spec(mechanisms=["linear"], positions=["rope"]))]
    assert case.positions == "rope" and case.layer_config().positions == "rope"
    (natural,) = sweep.expand(spec(mechanisms=["linear"]))
    assert natural.positions == "" and natural.layer_config().positions is None


def test_options_reach_only_the_mechanisms_that_declare_them_and_change_the_cost():
    cases = {c.mechanism: c for c in sweep.expand(spec(mechanisms=["standard", "bsbr"], options={"compression": 4}))}
    assert cases["standard"].options == "" and cases["bsbr"].options == option_text({"compression": 4}) == "compression=4"
    assert cases["bsbr"].option_values() == {"compression": 4}
    plain = rows_of(spec(mechanisms=["bsbr"], seqs=[64]))[("bsbr", "", "kernel")]
    compressed = rows_of(spec(mechanisms=["bsbr"], seqs=[64], options={"compression": 4}))[("bsbr", "", "kernel")]
    assert plain["status"] == compressed["status"] == "ok" and compressed["flops"] != plain["flops"]


def test_an_option_no_mechanism_declares_and_an_unknown_scheme_are_input_errors():
    with pytest.raises(UnknownNameError):
        sweep.validate(spec(options={"compression": 4}))
    with pytest.raises(UnknownNameError, match="unknown position scheme"):
        sweep.validate(spec(positions=["spiral"]))


def test_a_window_on_a_mechanism_that_takes_none_is_unsupported_not_ignored():
    rows = rows_of(spec(window=4))
    assert rows[("standard", "", "kernel")]["status"] == "ok"
    assert rows[("linear", "", "kernel")]["status"] == "unsupported" and "takes no sliding window" in rows[("linear", "", "kernel")]["message"]


def test_the_model_level_builds_the_scheme_and_window_it_records(monkeypatch):
    from attnbench.models import transformer

    built = []
    real = transformer.build_model
    monkeypatch.setattr(transformer, "build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    s = spec(mechanisms=["window"], impls=["sdpa"], levels=["model"], positions=["sinusoidal"], window=4, preset="tiny", seqs=[16])
    assert rows_of(s)[("window", "sinusoidal", "model")]["status"] == "ok"
    assert built and all(m.cfg.positions == "sinusoidal" and m.cfg.window == 4 for m in built)
    (case,) = sweep.expand(s)
    assert Case.from_row({k: format_value(v) for k, v in case.__dict__.items()}) == case  # as the CSV holds it


def test_speed_check_records_the_gate_verdict_and_a_wrong_impl_is_no_time(monkeypatch):
    import dataclasses

    from attnbench.models import registry

    s = spec(mechanisms=["linear"], impls=["chunked", "torch"], seqs=[32], check=True)
    rows = []
    Sweep(sweep.expand(s), rows.append, check=True).run()
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["chunked"]["status"] == "ok" and by_impl["chunked"]["check"].startswith("ok ")
    assert by_impl["torch"]["check"] == ""  # the definition is not checked against itself

    mechanism = registry.get("linear")
    right = mechanism.impls["chunked"]
    monkeypatch.setitem(mechanism.impls, "chunked", dataclasses.replace(right, run=lambda *a, **k: right.run(*a, **k) * 1.1))
    rows = []
    Sweep(sweep.expand(spec(mechanisms=["linear"], impls=["chunked"], seqs=[32])), rows.append, check=True).run()
    (row,) = rows
    assert row["status"] == "error" and row["check"].startswith("fail ") and "correctness gate" in row["message"]
    assert row.get("ms_median") is None
