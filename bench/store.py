"""The results store: one folder per run, a CSV appended and flushed row by row, meta.json.

    results/<run>/meta.json   command line, env, schema_version, sweep spec, started/finished
    results/<run>/speed.csv   one row per case, columns SPEED_COLUMNS (results/README.md)

A run killed at any moment (kill -9 mid-line included) resumes without loss or duplicates:
a final line without its newline is cut off on resume, and cases already recorded are skipped.
One process at a time writes a run folder (run_lock).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

from attnbench import console
from attnbench.case import ADDED_COLUMNS as ADDED_CASE_COLUMNS, CASE_COLUMNS
from attnbench.errors import InputError

SCHEMA_VERSION = 5  # 2: the preset column (model level); 3: the positions column of train and speed runs, speed's options; 4: speed's decode columns; 5: speed's packed-batch columns
DEFAULT_ROOT = Path("results")
SPEED_CSV = "speed.csv"
TRAIN_CSV = "train.csv"
DISTILL_CSV = "distill.csv"
RUN_CSVS = (SPEED_CSV, TRAIN_CSV, DISTILL_CSV)  # a run folder holds one of these
META_JSON = "meta.json"
LOCK_FILE = ".lock"  # the pid of the process writing the run (run_lock)

# After the case columns (bench/case.py: what identifies a case; resume and compare match rows on them), what was measured.
RESULT_COLUMNS = [
    "status", "message", "check", "ms_median", "ms_p20", "ms_p80", "first_call_ms",
    "tokens_per_s", "flops", "tflops", "pct_peak", "peak_mem_mib", "params",
    "bytes", "gbps", "pct_bandwidth", "mem_per_seq_mib", "cuda_graph",  # mode decode
    "mean_len", "flops_padded", "setup_ms",  # a packed batch (--lengths)
]
SPEED_COLUMNS = CASE_COLUMNS + RESULT_COLUMNS
DECODE_COLUMNS = ("queries", "bytes", "gbps", "pct_bandwidth", "mem_per_seq_mib", "cuda_graph")  # schema 4
VARLEN_COLUMNS = ("lengths", "pack", "mean_len", "flops_padded", "setup_ms")  # schema 5
# speed.csv files of earlier schemas lack some of these (read as empty): schema 2 all, schema 3 the decode
# and packed-batch ones, schema 4 the packed-batch ones
ADDED_COLUMNS = (*ADDED_CASE_COLUMNS, "check", *DECODE_COLUMNS, *VARLEN_COLUMNS)
STATUSES = ("ok", "oom", "error", "unsupported", "skipped")


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def new_run_dir(kind: str = "speed", root: Path = DEFAULT_ROOT) -> Path:
    """results/<YYYYmmdd-HHMMSS>-<kind> (not created yet)."""
    return root / f"{datetime.now():%Y%m%d-%H%M%S}-{kind}"


def _cannot_write(run_dir: Path, err: OSError) -> InputError:
    return InputError(f"cannot write to {run_dir}: {err.strerror or err}")


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and prove a file can be written there, or raise InputError."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise _cannot_write(run_dir, err) from None


# ---- one writer per run folder


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while writing it: take it before anything else in the folder.

    Two writers in one folder interleave rows (a resume while the run still writes records
    cases twice) and overwrite each other's meta.json. The lock is an flock on run_dir/.lock,
    which holds the owner's pid for the refusal's message; the kernel drops an flock when its
    process dies, so a lock left by a killed run is taken over (with a one-line note).
    Creates ``run_dir``; InputError when it cannot be written or another process holds it.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_write(run_dir, err) from None
    path = run_dir / LOCK_FILE
    fd = _acquire(path)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still holding the flock: a writer that opened this file sees it is gone
        os.close(fd)


def _acquire(path: Path) -> int:
    """The fd of ``path`` opened and flocked, holding this process's pid."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _cannot_write(path.parent, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_pid(fd) or "another process"
            os.close(fd)
            raise InputError(f"{path.parent} is being written by pid {owner}; "
                             "wait for it to finish, or write to another --out") from None
        if _still_there(fd, path):
            break
        os.close(fd)  # the owner released and removed the file between our open and flock: again
    left_by = _lock_pid(fd)
    if left_by:
        print(f"note: {path.parent}: taking over the lock left by pid {left_by}, which no longer runs", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _still_there(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (an owner removes it as it releases)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _lock_pid(fd: int) -> str:
    """The pid recorded in a lock file ('' when none is, yet, or the file holds something else)."""
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return text if text.isdigit() else ""


def latest_run(root: Path = DEFAULT_ROOT, needs: tuple[str, ...] = RUN_CSVS) -> Path:
    """The most recently started run under ``root`` holding meta.json and one of ``needs``."""
    runs = []
    for meta_path in root.glob(f"*/{META_JSON}"):
        run = meta_path.parent
        if any((run / name).exists() for name in needs):
            runs.append((_started(meta_path), run.name, run))
    if not runs:
        raise InputError(f"no runs with {' or '.join(needs)} under {root}/; run `attnbench speed` first")
    return max(runs)[2]


def _started(meta_path: Path) -> str:
    try:
        return str(json.loads(meta_path.read_text()).get("started", ""))
    except (OSError, ValueError):
        return ""


# ---- whole files


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write the new file to; leaving the block without an error
    renames it over ``path`` in one step, so a reader (or a kill) finds the old file or the new one,
    never half of one. The temp file is gone either way; its name carries the pid, so processes
    filling one cache do not write into each other's."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written whole (replacing)."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ---- meta.json


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """Write meta.json whole (a temp file and a rename: never half a file)."""
    write_json(run_dir / META_JSON, meta)


def read_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META_JSON
    if not path.exists():
        raise InputError(f"{run_dir} is not a run folder (no {META_JSON})")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path} is corrupt: {err}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path} is corrupt: not a JSON object")
    return meta


# ---- speed.csv


def _complete_text(path: Path) -> tuple[str, int]:
    """The file's text up to its last newline, and the byte length of that part."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", errors="replace"), end


def _parse(text: str, path: Path, columns: list[str], added: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of ``text`` under the header ``columns``; a file written before some of the ``added``
    columns existed (its header is ``columns`` without them, in order) reads with them empty."""
    reader = csv.reader(io.StringIO(text))
    rows = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        missing = [c for c in columns if c not in header]
        if missing and set(missing) <= set(added) and header == [c for c in columns if c in header]:
            return [{**dict.fromkeys(missing, ""), **row} for row in _parse(text, path, header)]
        if header != columns:
            raise InputError(f"{path} is corrupt or from another schema: its header (line 1) reads '{_printable(','.join(header))}', "
                             f"expected '{_printable(','.join(columns))}'")
        for values in reader:
            if len(values) != len(columns):
                raise InputError(f"{path} is corrupt: line {reader.line_num} has {len(values)} fields, expected {len(columns)}")
            rows.append(dict(zip(columns, values)))
    except csv.Error as err:
        raise InputError(f"{path} is corrupt: line {reader.line_num}: {_printable(str(err))}") from None
    return rows


def _printable(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters, all but printable ASCII shown as '?': a corrupt
    file's bytes reach the terminal neither as control codes nor as line breaks."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return shown + ("..." if len(text) > limit else "")


def read_rows(path: Path, columns: list[str] = SPEED_COLUMNS, added: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Every complete row of a results CSV as strings (a partial last line is ignored); ``added``:
    columns a file of an earlier schema lacks, read as empty."""
    if not path.exists():
        raise InputError(f"no {path.name} in {path.parent}")
    text, _ = _complete_text(path)
    return _parse(text, path, columns, added)


def format_value(value: Any) -> str:
    """How a value is written to the CSV: '' for None, 6 significant digits for floats."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"  # NaN -> empty
    return str(value)


class RowLog:
    """An append-only CSV: every row is written and flushed at once.

    Opening with ``resume`` keeps the rows already there (cutting a partial last line);
    without it the file must not exist yet.
    """

    def __init__(self, path: Path, columns: list[str] = SPEED_COLUMNS, resume: bool = False):
        self.path, self.columns = path, columns
        self.existing: list[dict[str, str]] = []
        if path.exists() and not resume:
            raise InputError(f"{path} exists; pass --resume to continue that run or --out a new folder")
        if path.exists():
            text, end = _complete_text(path)
            self.existing = _parse(text, path, columns)
            with open(path, "r+b") as f:
                f.truncate(end)
        new_file = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new_file:
            self._writer.writerow(columns)
            self._file.flush()

    def append(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"not columns of {self.path.name}: {sorted(unknown)}")
        self._writer.writerow([format_value(row.get(name)) for name in self.columns])
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RowLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def case_key(row: dict[str, Any]) -> tuple[str, ...]:
    """A row's case identity as written to the CSV (so written and re-read rows compare equal)."""
    return tuple(format_value(row.get(name)) for name in CASE_COLUMNS)


def recorded_keys(rows: Iterable[dict[str, Any]]) -> set[tuple[str, ...]]:
    return {case_key(row) for row in rows}


def read_cases(path: Path) -> list[dict[str, str]]:
    """The rows of a speed.csv, one per case, for the commands that read a finished run (report,
    compare). Two writers in one folder (a --resume racing the first run) can record a case
    twice: the last row of each case is kept, and one warning line on stderr says how many rows
    were dropped. A file without rows (0 bytes, or a header alone) is an InputError."""
    rows = read_rows(path, SPEED_COLUMNS, ADDED_COLUMNS)
    if not rows:
        raise InputError(f"no rows in {path}")
    last = {case_key(row): row for row in rows}  # a later row of the same case replaces the earlier one
    dropped = len(rows) - len(last)
    if dropped:
        console.err.print(f"warning: {path}: {dropped} duplicate row(s) of a case dropped (the last row of each case kept)",
                          style="yellow", markup=False, highlight=False, soft_wrap=True)
    return list(last.values())
