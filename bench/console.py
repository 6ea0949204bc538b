"""Rich rendering for the terminal: the sweep's progress bar and the tables the commands print.

Nothing here computes a result; every function takes rows or dicts and draws them.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Any, Callable, Iterator

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)

STATUS_STYLE = {"oom": "OOM", "error": "error", "unsupported": "-", "skipped": "skip"}


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (rich's elapsed-time format)."""
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


class PaceColumn(ProgressColumn):
    """Time left at this bar's own pace: its elapsed time over the steps it has done since it
    began (field ``first``: the step a resumed run began at), times the steps left; from the
    first step on, however slow. Before it, the task's ``estimate`` field (seconds), when one
    was given. (Rich's TimeRemainingColumn averages only the last 30 s of updates, so it shows
    nothing while a step takes longer than that.)"""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("first", 0)
        if done > 0 and task.elapsed and task.total is not None:
            text = f"eta {clock(task.elapsed / done * (task.total - task.completed))}"
        elif task.fields.get("estimate") is not None:
            text = f"eta ~{clock(task.fields['estimate'])}"
        else:
            text = "eta -:--:--"
        return Text(text, style="progress.remaining")


@contextlib.contextmanager
def sweep_progress(total: int) -> Iterator[Callable[[str, Any], None]]:
    """A progress bar over ``total`` steps (warm-up and timing of each case), on stderr."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), PaceColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("sweep", total=total)

        def on_step(phase: str, case) -> None:
            label = f"{phase:7s} {case.mechanism}/{case.impl} {case.level} {case.mode} {case.dtype} B={case.batch} T={case.seq}"
            progress.update(task, advance=1, description=label)

        yield on_step


@contextlib.contextmanager
def train_progress(enabled: bool = True) -> Iterator[Progress | None]:
    """A bar per trained mechanism with its live loss and time left (PaceColumn), on stderr;
    None when not ``enabled`` (the ranks of a DDP run other than the first)."""
    if not enabled:
        yield None
        return
    columns = [
        TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), PaceColumn(),
    ]
    with Progress(*columns, console=err) as progress:
        yield progress


CASE_COLUMNS = ["mechanism", "positions", "options", "level", "mode", "causal", "dtype", "device", "heads", "kv_heads", "head_dim",
                "window", "lengths", "batch", "seq"]  # the case columns the speed table shows (a pack: B is its N, T its longest)
SHORT = {"batch": "B", "seq": "T", "heads": "Hq", "kv_heads": "Hkv", "head_dim": "D"}


def speed_table(rows: list[dict[str, str]], title: str) -> tuple[Table, list[str]]:
    """One line per case, one column per impl (median ms or status); the fastest impl marked ★, and ≈ each
    other impl whose p20-p80 range overlaps the fastest's (the timing cannot order the two).

    Case columns that are the same on every row move into the title; impls that ran no case
    are left out. Returns the table and notes on what was left out and why.
    """
    from attnbench.timing import within_spread  # here: this module stays free of torch for the commands that need none

    varying = [c for c in CASE_COLUMNS if len({row.get(c, "") for row in rows}) > 1 or c in ("batch", "seq")]
    constant = [f"{SHORT.get(c, c)}={_show(c, rows[0][c])}" for c in CASE_COLUMNS if c not in varying and rows and rows[0].get(c)]
    ran = list(dict.fromkeys(row["impl"] for row in rows if row["status"] not in ("unsupported",)))
    notes = [
        f"{impl}: {reason}"
        for impl, reason in dict.fromkeys((r["impl"], r["message"]) for r in rows if r["impl"] not in ran)
    ]
    cases: dict[tuple, dict[str, dict[str, str]]] = {}
    for row in rows:
        cases.setdefault(tuple(row[c] for c in varying), {})[row["impl"]] = row
    # no vertical rules, impl names broken at their dashes, cells never cut: eight impls fit 80 columns
    table = Table(title=f"{title}\n{' '.join(constant)}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    for name in varying:
        table.add_column(SHORT.get(name, name), justify="right" if name in SHORT else "left", no_wrap=True)
    for impl in ran:
        table.add_column(impl.replace("-", "-\n") + "\nms", justify="right", no_wrap=True)
    for key, by_impl in cases.items():
        ok = {impl: float(r["ms_median"]) for impl, r in by_impl.items() if r["status"] == "ok"}
        fastest = min(ok, key=ok.get) if ok else None
        cells = []
        for impl in ran:
            row = by_impl.get(impl)
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append(f"[dim]{STATUS_STYLE[row['status']]}[/dim]")
            elif impl == fastest:
                cells.append(f"[bold green]★ {_ms(ok[impl])}[/bold green]")
            elif _spread(row) and _spread(by_impl[fastest]) and within_spread(*_spread(row), *_spread(by_impl[fastest])):
                cells.append(f"[green]≈ {_ms(ok[impl])}[/green]")
            else:
                cells.append(_ms(ok[impl]))
        table.add_row(*[_show(name, value) for name, value in zip(varying, key)], *cells)
    return table, notes


def _spread(row: dict[str, str]) -> tuple[float, float] | None:
    """A row's (p20, p80) in ms, None where the row has none (a row written before those columns)."""
    try:
        return float(row["ms_p20"]), float(row["ms_p80"])
    except (KeyError, ValueError):
        return None


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 1000 else f"{value:.3g}"


def _show(column: str, value: str) -> str:
    if column == "causal":
        return "causal" if value == "True" else "bidir"
    return value


def status_counts(rows: list[dict[str, str]]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def env_table(info: dict[str, Any], peaks: dict[str, Any] | None) -> Table:
    table = Table(show_header=False, title="environment", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        if key != "gpus":
            table.add_row(key, str(value))
    for gpu in info.get("gpus", []):
        table.add_row(f"gpu {gpu['index']}", ", ".join(f"{k}={v}" for k, v in gpu.items() if k != "index"))
    if peaks:
        for dtype, tflops in peaks["matmul_tflops"].items():
            table.add_row(f"measured {dtype} matmul", f"{tflops:.1f} TFLOP/s")
        table.add_row("measured copy", f"{peaks['copy_gbps']:.0f} GB/s")
    return table


def mechanisms_table(entries: list[dict[str, Any]]) -> Table:
    """``entries`` (attnbench.catalog.describe): per mechanism its family, position, supports
    and impls {name: reason or None} (None: available here). Cells fold rather than cut: a
    name is never shown as a prefix that reads as another name."""
    table = Table(title="mechanisms and impls on this machine", title_justify="left", show_lines=True)
    table.add_column("mechanism", no_wrap=True)
    for name in ("family", "position", "supports", "impls (green: available here)"):
        table.add_column(name, overflow="fold")
    for entry in entries:
        impls = " ".join(
            f"[green]{name}[/green]" if reason is None else f"[dim red]{name}[/dim red]" for name, reason in entry["impls"].items()
        )
        table.add_row(entry["name"], entry["family"], entry["position"], ", ".join(entry["supports"]), impls)
    return table


def params_table(entries: list[dict[str, Any]]) -> Table:
    """Every mechanism's parameters (what --option KEY=VALUE sets): name and default whole on
    one line (they are what the user types), the meaning wrapped into what width is left."""
    table = Table(title="mechanism parameters (--option KEY=VALUE)", title_justify="left")
    for name in ("mechanism", "parameter", "default"):
        table.add_column(name, no_wrap=True)
    table.add_column("meaning", overflow="fold")
    for entry in entries:
        for i, (name, default, meaning) in enumerate(entry["params"]):
            table.add_row(entry["name"] if i == 0 else "", name, escape(str(default)), escape(meaning),
                          end_section=i == len(entry["params"]) - 1)
    return table


def frame_table(df, title: str, keep: tuple[str, ...] = ()) -> Table:
    """A pandas DataFrame as a rich table (floats to 4 significant digits); columns that never
    vary are dropped unless in ``keep`` (the results themselves). Title and cells are text, not
    markup: a message or path with [brackets] shows whole."""
    varying = [c for c in df.columns if c in keep or df[c].nunique(dropna=False) > 1]
    table = Table(title=escape(title), title_justify="left")
    for column in varying:
        table.add_column(str(column))
    for row in df[varying].itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else escape(str(v)) for v in row])
    return table


def profile_table(case_profile, top: int) -> Table:
    """The ``top`` most expensive kernels of one profiled case (attnbench.speed.profile.CaseProfile)."""
    case = case_profile.case
    idle = 100.0 * max(0.0, 1.0 - case_profile.busy_ms / case_profile.wall_ms) if case_profile.wall_ms else 0.0
    title = (
        f"{case.mechanism}/{case.impl} {case.level} {case.mode} B={case.batch} T={case.seq}: "
        f"{case_profile.wall_ms:.3g} ms per call, {case_profile.busy_ms:.3g} ms busy ({idle:.0f}% idle)"
    )
    table = Table(title=title, title_justify="left")
    for name, justify in (("kernel", "left"), ("calls", "right"), ("ms", "right"), ("%", "right")):
        table.add_column(name, justify=justify)
    for row in case_profile.kernels.head(top).itertuples(index=False):
        name = row.kernel if len(row.kernel) <= 80 else row.kernel[:77] + "..."
        table.add_row(name, f"{row.calls_per_call:g}", f"{row.ms_per_call:.3g}", f"{row.pct_of_busy:.1f}")
    return table
