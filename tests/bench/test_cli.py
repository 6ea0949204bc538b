"""The command line through typer's CliRunner: speed, resume, list, env and every bad input."""

import json
import re

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from attnbench import store
from attnbench.cli import app

runner = CliRunner()
TINY = ["--heads", "2", "--head-dim", "8", "--device", "cpu", "--impl", "torch", "sdpa", "triton", "--batch", "2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_speed_writes_ok_rows_and_meta(tmp_path):
    out = tmp_path / "run"
    result = invoke("speed", "--seq", 8, 16, *TINY, "--out", out)
    assert result.exit_code == 0, result.output
    rows = store.read_rows(out / "speed.csv")
    assert len(rows) == 2 * 2 * 3  # seqs x modes (fwd, bwd) x impls
    assert {r["status"] for r in rows if r["impl"] != "triton"} == {"ok"}
    assert {r["status"] for r in rows if r["impl"] == "triton"} == {"unsupported"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["schema_version"] == store.SCHEMA_VERSION and meta["finished"]
    assert meta["spec"]["seqs"] == [8, 16] and meta["env"]["torch"] == torch.__version__
    assert "★" in result.output  # the fastest impl per case is marked


def test_profile_writes_the_kernel_breakdown_of_each_ok_case(tmp_path):
    out = tmp_path / "run"
    result = invoke("speed", "--seq", 16, "--mode", "fwd", *TINY, "--out", out, "--profile", 2, "--top", 3)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "profile.csv").to_dict("records")
    assert {r["impl"] for r in rows} == {"torch", "sdpa"}  # the triton row is unsupported on CPU: not profiled
    for impl in ("torch", "sdpa"):
        ops = [r for r in rows if r["impl"] == impl]
        assert 0 < float(ops[0]["busy_ms"]) and abs(sum(float(r["pct_of_busy"]) for r in ops) - 100) < 1e-6
        assert [float(r["ms_per_call"]) for r in ops] == sorted((float(r["ms_per_call"]) for r in ops), reverse=True)
    assert any("softmax" in r["kernel"] for r in rows if r["impl"] == "torch")  # the reference's own op shows up
    assert "ms per call" in result.output


def test_list_options_take_commas_and_repeated_flags(tmp_path):
    out = tmp_path / "run"
    result = invoke("speed", "--seq", "8,16", "--seq", 4, "--mode", "fwd", "--heads", 2, "--head-dim", 8,
                    "--device", "cpu", "--impl", "sdpa", "--tokens", 32, "--bidirectional", "--causal", "--out", out)
    assert result.exit_code == 0, result.output
    rows = store.read_rows(out / "speed.csv")
    assert sorted({(int(r["seq"]), int(r["batch"])) for r in rows}) == [(4, 8), (8, 4), (16, 2)]
    assert {r["causal"] for r in rows} == {"True", "False"}


def test_resume_after_a_kill_mid_line_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    assert invoke("speed", "--seq", 8, 16, *TINY, "--out", out).exit_code == 0
    complete = store.read_rows(out / "speed.csv")
    lines = (out / "speed.csv").read_bytes().splitlines(keepends=True)
    (out / "speed.csv").write_bytes(b"".join(lines[:-4]) + lines[-4][:10])  # 3 rows lost, one cut mid-line
    meta = json.loads((out / "meta.json").read_text())
    meta["finished"] = None
    (out / "meta.json").write_text(json.dumps(meta))

    result = invoke("speed", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    resumed = store.read_rows(out / "speed.csv")
    keys = [store.case_key(r) for r in resumed]
    assert len(keys) == len(set(keys)) == len(complete)
    assert set(keys) == {store.case_key(r) for r in complete}
    assert json.loads((out / "meta.json").read_text())["resumed"]


def test_resume_without_out_continues_the_latest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("speed", "--seq", 8, *TINY, "--mode", "fwd").exit_code == 0
    (run,) = (tmp_path / "results").iterdir()
    assert run.name.endswith("-speed")
    result = invoke("speed", "--resume")
    assert result.exit_code == 0, result.output
    assert len(store.read_rows(run / "speed.csv")) == 3


def test_resume_with_other_sweep_options_is_refused(tmp_path):
    out = tmp_path / "run"
    assert invoke("speed", "--seq", 8, *TINY, "--mode", "fwd", "--out", out).exit_code == 0
    result = invoke("speed", "--resume", "--out", out, "--seq", 4096)
    assert result.exit_code == 2 and "--resume continues" in result.output


def test_resume_on_another_gpu_or_torch_is_refused(tmp_path):
    out = tmp_path / "run"
    assert invoke("speed", "--seq", 8, *TINY, "--mode", "fwd", "--out", out).exit_code == 0
    meta = json.loads((out / "meta.json").read_text())
    meta["env"]["gpus"] = [{"name": "NVIDIA H100 80GB HBM3"}]
    (out / "meta.json").write_text(json.dumps(meta))
    before = (out / "speed.csv").read_bytes()
    result = invoke("speed", "--resume", "--out", out)
    assert result.exit_code == 2 and "H100" in result.output and "new --out" in result.output
    assert (out / "speed.csv").read_bytes() == before


def test_list_shows_mechanisms_and_why_impls_are_unavailable():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    assert "standard" in result.output and "exact" in result.output
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in result.output


def test_list_params_counts_every_preset_and_says_why_a_model_cannot_build():
    result = invoke("list", "--params", "--task", "mlm")
    assert result.exit_code == 0, result.output
    for preset in ("tiny", "small", "base"):
        assert preset in result.output
    from attnbench.train.run import param_table

    (deltanet,) = param_table(["tiny"], ["deltanet"], task="mlm")
    assert "causal only" in deltanet["message"]  # no BERT-style (bidirectional) model of it


def test_env_reports_versions_as_json():
    result = invoke("env", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["torch"] == torch.__version__ and "git" in info and info["peaks"] is None


def test_help_lists_every_command():
    result = invoke("--help")
    for command in ("speed", "report", "compare", "env", "list"):
        assert command in result.output


def corrupt_run(tmp_path):
    run = tmp_path / "corrupt"
    run.mkdir(exist_ok=True)
    (run / "meta.json").write_text("{}")
    (run / "speed.csv").write_text("not,a,results,file\n1,2,3,4\n")
    return run


def unwritable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "run"


BAD_INPUTS = {
    "unknown mechanism": (["speed", "--attn", "nope"], "unknown mechanism 'nope'; valid: .*standard"),
    "unknown impl": (["speed", "--impl", "cutlass"], "unknown impl 'cutlass'.*valid:"),
    "zero seq": (["speed", "--seq", "0"], "--seq must be positive"),
    "negative seq": (["speed", "--seq", "128", "-5"], "--seq must be positive, got -5"),
    "heads vs kv-heads": (["speed", "--heads", "4", "--kv-heads", "3"], r"--heads \(4\) must be a multiple"),
    "unknown dtype": (["speed", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    "batch and tokens": (["speed", "--batch", "2", "--tokens", "64"], "not both"),
    "unknown level": (["speed", "--level", "network"], "unknown level"),
    "negative profile": (["speed", "--profile", "-1"], "--profile must be >= 0"),
    "unwritable out": (["speed", "--out", unwritable, "--seq", "8", "--impl", "torch"], "cannot write"),
    "report on missing folder": (["report", "does-not-exist"], "no run folder"),
    "report on corrupt folder": (["report", corrupt_run], "corrupt"),
    "report without runs": (["report"], "no runs"),
    "compare on missing folder": (["compare", "nope-a", "nope-b"], "no speed.csv"),
    "compare on corrupt folder": (["compare", corrupt_run, corrupt_run], "corrupt"),
    "option not a KEY=VALUE": (["train", "--attn", "nsa", "--option", "topn"], "expected KEY=VALUE"),
    "option nobody declares": (["train", "--attn", "linear", "--option", "topn=4"], "option 'topn' is not a parameter of linear"),
    "window option not an integer": (["train", "--attn", "window", "--option", "window=abc"], "--window must be a positive integer, not 'abc'"),
    "distill window not positive": (["distill", "--teacher", "t", "--student", "window", "--window", "0"], "--window must be a positive integer, not 0"),
    "impl for a mechanism not trained": (["train", "--attn", "linear", "--impl", "auto,nsa=torch"], "--impl nsa=torch: nsa is not one of the mechanisms"),
    "two default impls": (["distill", "--teacher", "t", "--student", "linear", "--impl", "torch,chunked"], "one impl for every mechanism"),
    "distill option nobody declares": (["distill", "--teacher", "t", "--student", "linear", "--option", "x=1"], "option 'x'"),
    "check unknown mechanism": (["check", "--attn", "no-such"], "unknown mechanism 'no-such'; valid: .*standard"),
    "check impl the mechanism lacks": (["check", "--attn", "linear", "--impl", "triton"], "unknown impl 'triton' for linear; valid:"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "report" alone looks for results/ here
    args, message = BAD_INPUTS[case]
    args = [str(a(tmp_path)) if callable(a) else a for a in args]
    if args[0] == "speed":
        args += ["--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "results").exists() or case == "report without runs"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_mechanism_options_are_python_literals_or_strings():
    from attnbench.cli import mechanism_options

    assert mechanism_options(8, ["topn=4", "theta=1e4", "feature_map=elu", "causal_only=True"]) == {
        "window": 8, "topn": 4, "theta": 10000.0, "feature_map": "elu", "causal_only": True,
    }


def test_device_cuda_without_cuda_is_exit_code_2():
    result = invoke("speed", "--device", "cuda", "--seq", 8)
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_help_needs_no_heavy_imports():
    import subprocess
    import sys

    code = "import sys, attnbench.cli; print(sorted({'torch', 'triton', 'seaborn', 'pandas'} & set(sys.modules)))"
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[]", f"`attnbench --help` imports {heavy}"


COMMANDS = ("speed", "report", "compare", "env", "list", "check", "distill", "train")


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=lambda c: " ".join(c) or "attnbench")
def test_help_shows_no_type_placeholders(command):
    """Flags show nothing after their name, and values a plain metavar: no typer `<bool>`, `<list[str]>`."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    assert "Usage: attnbench" in result.output
    assert re.findall(r"<[a-z]+(?:\[[a-z|, ]+\])?>", result.output) == [], result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_help_shows_the_help_of_arguments():
    assert "Baseline run folder" in invoke("compare", "--help").output
    assert "Run folders" in invoke("report", "--help").output


def test_commands_cover_the_app():
    import typer

    assert sorted(typer.main.get_command(app).commands) == sorted(COMMANDS)


class HandedOver(Exception):
    """Raised by a stand-in for the function a command hands its parsed options to."""


@pytest.fixture
def handed_over(monkeypatch):
    """Each command's hand-off function replaced by one that stops the command with what it got:
    the command line is parsed for real, nothing runs."""
    import importlib

    def stop(*args, **kwargs):
        raise HandedOver(args, kwargs)

    for module, function in [("attnbench.speed.run", "run_speed"), ("attnbench.train.run", "run_train"),
                             ("attnbench.distill.run", "run_distill"), ("attnbench.devtools.check", "run_check"),
                             ("attnbench.report.render", "render_report")]:
        monkeypatch.setattr(importlib.import_module(module), function, stop)

    def run(*args):
        result = invoke(*args)
        assert isinstance(result.exception, HandedOver), result.output
        return result.exception.args

    run.stop = stop
    return run


# (command with its other required options, list option, values, what the command hands over)
LIST_OPTIONS = [
    (["speed", "--device", "cpu"], "--attn", ["standard", "rope"], lambda args, kw: args[0].mechanisms),
    (["speed", "--device", "cpu"], "--impl", ["torch", "sdpa"], lambda args, kw: args[0].impls),
    (["speed", "--device", "cpu"], "--level", ["kernel", "layer"], lambda args, kw: args[0].levels),
    (["speed", "--device", "cpu"], "--mode", ["fwd", "fwdbwd"], lambda args, kw: args[0].modes),
    (["speed", "--device", "cpu"], "--seq", ["8", "16"], lambda args, kw: [str(s) for s in args[0].seqs]),
    (["speed", "--device", "cpu"], "--batch", ["1", "2"], lambda args, kw: [str(b) for b in args[0].batches]),
    (["speed", "--device", "cpu"], "--dtype", ["fp32", "fp16"], lambda args, kw: args[0].dtypes),
    (["train"], "--attn", ["standard", "rope"], lambda args, kw: args[0].attn),
    (["train", "--attn", "linear", "nsa"], "--impl", ["auto", "nsa=torch"], lambda args, kw: args[0].impl.split(",")),
    (["distill", "--teacher", "t"], "--student", ["linear", "nsa"], lambda args, kw: args[0].students),
    (["distill", "--teacher", "t", "--student", "linear", "nsa"], "--impl", ["auto", "nsa=torch"],
     lambda args, kw: args[0].impl.split(",")),
    (["check"], "--attn", ["standard", "rope"], lambda args, kw: list(args[0])),
    (["report"], "--baseline", ["sdpa", "torch"], lambda args, kw: args[2]),
]
SYNTAXES = {
    "commas": lambda flag, values: [flag, ",".join(values)],
    "spaces": lambda flag, values: [flag, *values],
    "repeated flags": lambda flag, values: [x for value in values for x in (flag, value)],
    "flag=commas": lambda flag, values: [f"{flag}={','.join(values)}"],
}


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("case", LIST_OPTIONS, ids=lambda case: f"{case[0][0]} {case[1]}")
def test_every_list_option_takes_commas_spaces_and_repeated_flags(case, syntax, handed_over):
    command, flag, values, handed = case
    args, kwargs = handed_over(*command, *SYNTAXES[syntax](flag, values))
    assert handed(args, kwargs) == values


def test_all_and_mechanism_impl_entries_stay_list_values(handed_over):
    from attnbench.models.registry import mechanisms

    (spec, *_), _ = handed_over("train", "--attn", "all", "--impl", "auto", "nsa=torch")
    assert spec.attn == list(mechanisms()) and spec.impl == "auto,nsa=torch"
    (spec, *_), _ = handed_over("speed", "--device", "cpu", "--attn", "all", "--impl", "all")
    assert spec.mechanisms == list(mechanisms()) and spec.impls is None


def test_option_values_split_at_commas_outside_brackets_and_quotes(handed_over, monkeypatch):
    """--option is a list option too: `a=1,b=2` is two entries, but a comma inside a Python
    literal (a tuple, a list, a quoted string) belongs to its value."""
    from attnbench import cli
    from attnbench.cli import mechanism_options

    monkeypatch.setattr(cli, "mechanism_options", handed_over.stop)
    (window, option), _ = handed_over("train", "--attn", "exposb", "--option", "a=1,b=(1, 2),c='x,y'", "d=4",
                                      "--option", "e=[5,6]", "--window", 8)
    assert window == 8 and option == ["a=1", "b=(1, 2)", "c='x,y'", "d=4", "e=[5,6]"]
    assert mechanism_options(None, option) == {"a": 1, "b": (1, 2), "c": "x,y", "d": 4, "e": [5, 6]}


def test_a_list_flag_without_a_value_is_refused_not_ignored(tmp_path):
    tiny = ["speed", "--seq", 8, "--mode", "fwd", *TINY, "--out", tmp_path / "run"]  # were the flag ignored: a tiny run
    for empty in (["--mode"], ["--attn", ","], ["--attn="]):
        result = invoke(*tiny, *empty)
        assert result.exit_code == 2 and empty[0].rstrip("=") in result.stderr, (empty, result.output)
    assert not (tmp_path / "run").exists()


MALFORMED = {
    "speed int": (["speed", "--seq", "512", "abc"], r"--seq.*'abc' is not a valid integer"),
    "train int": (["train", "--attn", "rope", "--steps", "many"], r"--steps.*'many' is not a valid integer"),
    "distill float": (["distill", "--teacher", "t", "--student", "linear", "--lr", "fast"], r"--lr.*'fast' is not a valid float"),
    "check int": (["check", "--max-seq", "1k"], r"--max-seq.*'1k' is not a valid integer"),
    "compare float": (["compare", "a", "b", "--threshold", "x"], r"--threshold.*'x' is not a valid float"),
    "env unknown option": (["env", "--jsn"], r"No such option.*--jsn.*Did you mean '?--json"),
    "list missing value": (["list", "--task"], r"--task.*requires an argument"),
    "report missing value": (["report", "--out"], r"--out.*requires an argument"),
    "distill missing option": (["distill", "--student", "linear"], r"Missing option '--teacher'"),
    "train extra argument": (["train", "--attn", "rope", "--steps", "3", "4"], r"unexpected extra argument \(4\)"),
    "unknown command": (["spede"], r"No such command 'spede'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_command_line_is_one_line_on_stderr_and_exit_code_2(case):
    args, message = MALFORMED[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_no_arguments_still_print_the_help():
    result = invoke()
    assert "Usage: attnbench" in result.output and "speed" in result.output and "error" not in result.output
