"""`--config FILE.toml`: the file's options become the command's defaults, the command line
overrides them, an unknown key is one line and exit 2, and a run folder's config.toml repeats it."""

import pytest
from typer.testing import CliRunner

from attnbench import store
from attnbench.train import run as train
from attnbench.cli import app

runner = CliRunner()
TINY_SPEED = 'heads = 2\nhead-dim = 8\nbatch = [2]\nimpl = "torch"\nmode = ["fwd"]\ndevice = "cpu"\n'


def cases(run_dir):
    return sorted((r["impl"], r["mode"], r["seq"]) for r in store.read_rows(run_dir / store.SPEED_CSV))


def test_the_file_sets_defaults_and_the_command_line_overrides_them(tmp_path):
    (tmp_path / "c.toml").write_text(TINY_SPEED + "seq = [8, 16]\n")
    result = runner.invoke(app, ["speed", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert cases(tmp_path / "a") == [("torch", "fwd", "16"), ("torch", "fwd", "8")]
    result = runner.invoke(app, ["speed", "--config", str(tmp_path / "c.toml"), "--seq", "32", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert cases(tmp_path / "b") == [("torch", "fwd", "32")]


def test_a_run_folders_config_repeats_the_run(tmp_path):
    (tmp_path / "c.toml").write_text(TINY_SPEED + 'seq = "8,16"\n')  # a list option also takes "a,b"
    assert runner.invoke(app, ["speed", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "a")]).exit_code == 0
    kept = tmp_path / "a" / "config.toml"
    assert store.read_meta(tmp_path / "a")["config"]["seq"] == [8, 16] and "out" not in kept.read_text()
    again = runner.invoke(app, ["speed", "--config", str(kept), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert cases(tmp_path / "b") == cases(tmp_path / "a")


def test_train_keeps_its_config_and_repeats_from_it(tmp_path, monkeypatch):
    seen = []

    def fake_run_train(spec, out, resume, options):  # what the command asks for, without training
        from attnbench import config

        out.mkdir(parents=True)
        config.keep(out, {}, options)
        seen.append(spec)
        return out

    monkeypatch.setattr(train, "run_train", fake_run_train)
    args = ["train", "--attn", "rope,window", "--window", "16", "--option", "theta=500.0", "--preset", "tiny", "--steps", "7"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert seen[1] == seen[0] and seen[0].extra == {"window": 16, "theta": 500.0}


@pytest.mark.parametrize("text, message", [
    ("bogus = 1\n", "unknown key 'bogus'; valid: attn"),
    ("out = 'x'\n", "unknown key 'out'"),  # where a run goes is not part of what it is
    ("steps = \n", "not TOML"),
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, text, message):
    (tmp_path / "c.toml").write_text(text)
    result = runner.invoke(app, ["train", "--attn", "rope", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
