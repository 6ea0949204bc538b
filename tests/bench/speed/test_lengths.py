"""--lengths parsed into a pack (bench/speed/lengths.py): a list is the pack, uniform:LO-HI and
file:PATH draw with the seed until --tokens, bad input is one line and exit 2."""

import pytest
import torch
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.errors import InputError
from attnbench.speed import lengths

runner = CliRunner()


def test_a_list_is_the_pack_itself_in_order():
    asked = lengths.parse(["256", "1024", "40"])
    assert asked.text == "256,1024,40" and not asked.drawn
    assert asked.pack(None, seed=0) == asked.pack(None, seed=5) == [256, 1024, 40]


def test_uniform_draws_within_its_bounds_until_the_pack_holds_the_tokens():
    asked = lengths.parse(["uniform:16-64"])
    assert asked.text == "uniform:16-64" and asked.drawn
    pack = asked.pack(1000, seed=0)
    assert sum(pack) == 1000
    assert all(16 <= n <= 64 for n in pack[:-1]) and 1 <= pack[-1] <= 64  # only the last one is cut
    assert len(set(pack[:-1])) > 1


def test_uniform_is_reproducible_per_seed():
    asked = lengths.parse(["uniform:256-4096"])
    assert asked.pack(16384, seed=3) == asked.pack(16384, seed=3)
    assert asked.pack(16384, seed=3) != asked.pack(16384, seed=4)


def test_uniform_of_one_length_is_that_length_with_the_rest_cut():
    assert lengths.parse(["uniform:100-100"]).pack(350, seed=0) == [100, 100, 100, 50]


def test_a_file_is_the_distribution_drawn_from(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("# document lengths\n30\n\n  500 \n7\n")
    asked = lengths.parse([f"file:{path}"])
    assert asked.text == f"file:{path}" and asked.drawn
    pack = asked.pack(5000, seed=1)
    assert sum(pack) == 5000 and set(pack[:-1]) <= {30, 500, 7} and set(pack[:-1]) == {30, 500, 7}
    assert pack == asked.pack(5000, seed=1)


def test_cu_seqlens_are_the_int32_offsets():
    got = lengths.cu_seqlens([3, 5, 1])
    assert got.dtype == torch.int32 and got.tolist() == [0, 3, 8, 9]


@pytest.mark.parametrize("values, message", [
    (["0"], "a sequence length is a positive integer, got '0'"),
    (["12", "x"], "a sequence length is a positive integer, got 'x'"),
    (["uniform:64-16"], "expected uniform:LO-HI with 1 <= LO <= HI"),
    (["uniform:0-16"], "expected uniform:LO-HI with 1 <= LO <= HI"),
    (["uniform:16"], "expected uniform:LO-HI"),
    (["normal:100-20"], "unknown form 'normal:'"),
    (["uniform:16-64", "128"], "not several"),
    (["file:/no/such/file"], "cannot read it"),
])
def test_bad_lengths_are_input_errors(values, message):
    with pytest.raises(InputError, match=message):
        lengths.parse(values)


def test_a_file_without_lengths_or_with_a_bad_line_is_an_input_error(tmp_path):
    empty, bad = tmp_path / "empty.txt", tmp_path / "bad.txt"
    empty.write_text("# nothing\n\n")
    bad.write_text("12\n-3\n")
    with pytest.raises(InputError, match="no lengths in it"):
        lengths.parse([f"file:{empty}"])
    with pytest.raises(InputError, match=r"line 2: a sequence length is a positive integer, got '-3'"):
        lengths.parse([f"file:{bad}"])


@pytest.mark.parametrize("args, message", [
    (["--lengths", "uniform:64-16"], "expected uniform:LO-HI"),
    (["--lengths", "16", "0"], "got '0'"),
    (["--lengths", "file:/no/such/file"], "cannot read it"),
    (["--lengths", "16", "32", "--tokens", "48"], "is the pack itself (48 tokens): drop --tokens"),
    (["--lengths", "uniform:16-64", "--mode", "decode", "--context", "64"], "a decode step has no packed form"),
    (["--lengths", "uniform:16-64", "--seq", "64"], "--lengths replaces --seq"),
    (["--lengths", "uniform:16-64", "--batch", "2"], "--lengths replaces --batch"),
    (["--lengths", "uniform:16-64", "--check"], "--check gates B x T cases"),
    (["--lengths", "16", "32", "--seed", "3"], "--seed draws the lengths of --lengths uniform:LO-HI or file:PATH"),
    (["--seq", "64", "--seed", "3"], "--seed draws the lengths"),
    (["--lengths", "uniform:16-64", "--tokens", "0"], "--tokens must be positive"),
])
def test_bad_lengths_on_the_command_line_are_one_line_and_exit_2(args, message, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["speed", "--device", "cpu", "--heads", "2", "--head-dim", "8", *args, "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert not out.exists()
