"""The results store: rows on disk at once, resume after a kill mid-line, corrupt files, latest run."""

import json
import os
import re
import subprocess
import sys

import pytest

from attnbench import store
from attnbench.errors import InputError


def row(seq, status="ok", **extra):
    base = dict(mechanism="standard", impl="torch", level="kernel", mode="fwd", dtype="fp32", device="cpu",
                batch=2, seq=seq, heads=2, kv_heads=2, head_dim=8, causal=True, window=None, status=status, message="")
    return {**base, **extra}


def test_every_row_is_on_disk_as_soon_as_it_is_appended(tmp_path):
    path = tmp_path / "speed.csv"
    with store.RowLog(path) as log:
        log.append(row(8, ms_median=0.25))
        on_disk = store.read_rows(path)  # read while the log is still open
    assert len(on_disk) == 1
    assert on_disk[0]["seq"] == "8" and on_disk[0]["ms_median"] == "0.25" and on_disk[0]["window"] == ""


def test_resume_cuts_a_partial_last_line_and_keeps_complete_rows(tmp_path):
    path = tmp_path / "speed.csv"
    with store.RowLog(path) as log:
        for seq in (8, 16, 32):
            log.append(row(seq, ms_median=1.5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])  # killed mid-line: the last row lost its tail and newline
    with store.RowLog(path, resume=True) as log:
        assert [r["seq"] for r in log.existing] == ["8", "16"]
        log.append(row(32, ms_median=1.5))
    rows = store.read_rows(path)
    assert [r["seq"] for r in rows] == ["8", "16", "32"]
    assert len(store.recorded_keys(rows)) == 3


def test_a_kill_before_the_header_finished_leaves_a_usable_file(tmp_path):
    path = tmp_path / "speed.csv"
    path.write_text("mechanism,impl,le")
    with store.RowLog(path, resume=True) as log:
        assert log.existing == []
        log.append(row(8))
    assert len(store.read_rows(path)) == 1


def test_starting_over_an_existing_csv_needs_resume(tmp_path):
    path = tmp_path / "speed.csv"
    store.RowLog(path).close()
    with pytest.raises(InputError, match="--resume"):
        store.RowLog(path)


@pytest.mark.parametrize("content, match", [
    ("a,b,c\n1,2,3\n", "header"),
    (",".join(store.SPEED_COLUMNS) + "\nstandard,torch\n", "line 2"),
])
def test_corrupt_csv_is_an_input_error(tmp_path, content, match):
    path = tmp_path / "speed.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        store.read_rows(path)


def test_written_and_reread_rows_have_the_same_case_key(tmp_path):
    path = tmp_path / "speed.csv"
    written = row(64, window=None, causal=False)
    with store.RowLog(path) as log:
        log.append(written)
    assert store.case_key(store.read_rows(path)[0]) == store.case_key(written)


def test_latest_run_is_the_last_started(tmp_path):
    for name, started in (("b-old", "2024-01-01T00:00:00"), ("a-new", "2025-06-01T00:00:00")):
        run = tmp_path / name
        run.mkdir()
        (run / "meta.json").write_text(json.dumps({"started": started}))
        (run / "speed.csv").write_text("")
    (tmp_path / "no-csv").mkdir()
    (tmp_path / "no-csv" / "meta.json").write_text(json.dumps({"started": "2026-01-01T00:00:00"}))
    assert store.latest_run(tmp_path) == tmp_path / "a-new"


def test_latest_run_without_runs_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no runs"):
        store.latest_run(tmp_path)


def test_unwritable_folder_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write"):
        store.ensure_writable(blocker / "run")


def test_meta_is_replaced_whole(tmp_path):
    store.write_meta(tmp_path, {"started": "x", "finished": None})
    store.write_meta(tmp_path, {"started": "x", "finished": "y"})
    assert store.read_meta(tmp_path) == {"started": "x", "finished": "y"}
    assert sorted(os.listdir(tmp_path)) == ["meta.json"]


# ---- one writer per run folder


def test_a_second_writer_is_refused_naming_the_owner_and_a_killed_owners_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    hold = "import sys, time; from pathlib import Path; from attnbench import store\n" \
           "with store.run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)"
    owner = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"^{re.escape(str(run))} is being written by pid {owner.pid}; "):
            with store.run_lock(run):
                pass
    finally:
        owner.kill()  # kill -9: the owner never releases its lock
        owner.wait()
    assert (run / ".lock").exists()
    with store.run_lock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith("note: ") and f"pid {owner.pid}" in note
    assert not (run / ".lock").exists()


def test_the_lock_creates_the_folder_and_is_released_on_an_error(tmp_path):
    run = tmp_path / "a" / "run"
    with pytest.raises(KeyError):
        with store.run_lock(run):
            assert run.is_dir()
            raise KeyError("the run failed")
    assert list(run.iterdir()) == []
    with store.run_lock(run):  # free again
        pass


def test_locking_an_unwritable_folder_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write"):
        with store.run_lock(blocker / "run"):
            pass


@pytest.mark.parametrize("content, line", [
    (b"\x89PNG\r\n\x1a\n\x00\x1b[31m\xff\xfe\n", 1),
    ((",".join(store.SPEED_COLUMNS) + "\n").encode() + b"x," * (len(store.SPEED_COLUMNS) - 1) + b"x\n\x00\x1b]0;\x07\xfe,\xff\n", 3),
])
def test_a_binary_csv_is_named_in_one_printable_line(tmp_path, content, line):
    path = tmp_path / "speed.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        store.read_rows(path)
    message = str(err.value)
    assert message.startswith(f"{path} is corrupt") and f"line {line}" in message
    assert all(" " <= c <= "~" for c in message), ascii(message)


def test_replacing_swaps_the_whole_file_in_or_leaves_the_old_one(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with store.replacing(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with store.replacing(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing reaches path before the block ends
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_a_speed_csv_of_schema_4_reads_with_the_packed_batch_columns_empty(tmp_path):
    path = tmp_path / "speed.csv"
    before = [c for c in store.SPEED_COLUMNS if c not in store.VARLEN_COLUMNS]
    values = {**{c: "" for c in before}, **{k: str(v) for k, v in row(8).items() if v is not None}}
    path.write_text(",".join(before) + "\n" + ",".join(values[c] for c in before) + "\n")
    (read,) = store.read_cases(path)
    assert sorted(read) == sorted(store.SPEED_COLUMNS) and read["seq"] == "8"
    assert all(read[c] == "" for c in store.VARLEN_COLUMNS)


def test_every_committed_reference_run_still_reads():
    runs = sorted(store.DEFAULT_ROOT.glob("reference-*/**/speed.csv"))
    assert runs
    for path in runs:
        assert store.read_cases(path), path
