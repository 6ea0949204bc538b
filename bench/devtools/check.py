"""`attnbench check`: every impl of every mechanism against the mechanism's plain-torch
definition, at real sizes on a GPU (or small ones on the CPU): the correctness gate
(attnbench.gate) over a matrix of lengths, masks, GQA, position schemes and windows. The table
shows, per output and gradient, the impl's error as a multiple of torch's own low-precision
error; a cell that cannot run (an impl missing here, a scheme a mechanism refuses) is a row of
status unsupported with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch

from attnbench import store
from attnbench.errors import InputError
from attnbench.gate import (  # noqa: F401 (CheckCase, measure: re-exported for the check's tests)
    CHECK_OPTIONS, LOW_PRECISION, REFERENCE, CheckCase, Measurement, layer_case, measure, passed, run_cases, why_not,
)


def table(rows: Sequence[Measurement]):
    """A rich table: one line per case and output with errors, ratio and pass/fail."""
    from rich.table import Table

    out = Table(title="kernel vs reference (ratio = kernel error / torch low-precision error; pass: <= 2x + 1/2 ulp)")
    for column in ("case", "output", "kernel err", "torch err", "ratio", "result"):
        out.add_column(column, justify="left" if column in ("case", "output", "result") else "right")
    for row in rows:
        style = "green" if row.status == "ok" else "red"
        result = "pass" if row.status == "ok" else f"{row.status.upper()} {row.message}".strip()
        out.add_row(row.case, row.output, f"{row.kernel_error:.3g}", f"{row.torch_error:.3g}", f"{row.ratio:.2f}", f"[{style}]{result}[/]")
    return out


# --- the softmax family's matrix: registry mechanisms, triton impl against torch impl ---


def _seq_lengths(max_seq: int) -> list[int]:
    """1k, a length that is no multiple of any block, and powers of two up to max_seq."""
    lengths = {min(1024, max_seq), min(1037, max_seq)}  # 1037: odd, no multiple of any tile
    t = 4096
    while t <= max_seq:
        lengths.add(t)
        t *= 4
    lengths.add(max_seq)
    return sorted(lengths)


def _heads_for(batch: int, seq: int) -> int:
    """Query heads (>= 2, for GQA) that keep the float64 reference's B x H x T x T tensors
    (~8 live in its fwd+bwd) within ~16 GiB."""
    budget_heads = 16 * 2**30 / (8 * 8 * batch * seq * seq)
    return max(2, min(8, 2 ** int(math.log2(max(budget_heads, 1)))))


def checked_mechanisms(names: Sequence[str], impls: Sequence[str] | None = None) -> list:
    """The registry entries of ``names`` ('all': every one); UnknownNameError (with the valid
    names) for an unknown mechanism, or an impl none of them has. Needs no GPU."""
    from attnbench.models import registry

    mechanisms = list(registry.mechanisms().values()) if "all" in names else [registry.get(name) for name in names]
    known = {impl for m in mechanisms for impl in m.impls}
    for impl in impls or ():
        if impl not in known:
            raise InputError(f"unknown impl '{impl}' for {', '.join(m.name for m in mechanisms)}; valid: {', '.join(sorted(known))}")
    return mechanisms


def mechanism_cases(names: Sequence[str], max_seq: int, dtype: torch.dtype, head_dims=(64, 128), *, impls=None,
                    schemes: Sequence[str | None] = (None,), window: int | None = None, device: str = "cuda") -> list[CheckCase]:
    """Causal and bidirectional (with key padding) cases of every impl of each mechanism but its
    `torch` definition (or of ``impls``) against that definition, GQA 2:1, at every length of
    _seq_lengths(max_seq), for each position scheme of ``schemes`` (None: the mechanism's own)
    and ``window``."""
    from attnbench.models import positions, registry

    cases = []
    for mechanism in checked_mechanisms(names, impls):
        for scheme in schemes:
            for i, seq in enumerate(_seq_lengths(max_seq)):
                head_dim = head_dims[i % len(head_dims)]
                for causal in (True, False):
                    heads = _heads_for(1 if causal else 2, seq)
                    cfg = registry.LayerConfig(
                        dim=heads * head_dim, heads=heads, kv_heads=heads // 2, causal=causal, window=window,
                        positions=positions.layer_scheme(scheme), options=CHECK_OPTIONS.get(mechanism.name, {}),
                    )
                    shape = f"{'causal' if causal else 'bidir+pad'} T={seq} H={heads}/{heads // 2} D={head_dim}"
                    label = mechanism.name + (f"+{scheme}" if scheme else "") + (f" window={window}" if window else "")
                    for impl in (impls or [n for n in mechanism.impls if n != REFERENCE]):
                        if impl not in mechanism.impls:
                            continue
                        name = f"{label}/{impl} {shape}"
                        reason = why_not(mechanism, scheme, dataclasses.replace(cfg, impl=impl), device, dtype, padded=not causal)
                        if reason:
                            cases.append(CheckCase(name, None, None, None, device, reason))
                        else:
                            cases.append(layer_case(name, mechanism, dataclasses.replace(cfg, impl=impl), seq, dtype, not causal, device))
    return cases


CHECK_COLUMNS = ["case", "output", "kernel_error", "torch_error", "ratio", "status", "message"]


def run_check(attn: Sequence[str], max_seq: int, dtype_name: str, console=None, csv_path: Path | None = None, *,
              impls: Sequence[str] | None = None, positions: Sequence[str] | None = None, window: int | None = None,
              device: str | None = None) -> bool:
    """`attnbench check`: print the table of every impl of ``attn`` against its definition; True
    when every case that can run passes. ``csv_path``: also write every row there as it is
    measured (CHECK_COLUMNS). ``device``: cuda (default when present) or cpu (small --max-seq)."""
    from rich.console import Console

    from attnbench.models import positions as schemes

    if dtype_name not in LOW_PRECISION:
        raise InputError(f"unknown dtype '{dtype_name}'; valid: {', '.join(LOW_PRECISION)}")
    if max_seq < 1:
        raise InputError(f"--max-seq must be positive, got {max_seq}")
    if window is not None and window < 1:
        raise InputError(f"--window must be positive, got {window}")
    for scheme in positions or ():
        schemes.check_scheme(scheme)
    checked_mechanisms(attn, impls)
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        raise InputError("attnbench check needs a CUDA GPU (the Triton kernels run there); none found (--device cpu checks the CPU impls)")
    console = console or Console()
    cases = mechanism_cases(attn, max_seq, LOW_PRECISION[dtype_name], impls=impls, schemes=positions or (None,), window=window, device=device)
    log = None
    if csv_path is not None:
        store.ensure_writable(csv_path.parent)
        log = store.RowLog(csv_path, CHECK_COLUMNS)

    def on_row(row: Measurement) -> None:
        said = row.message if row.status == "unsupported" else f"error {row.ratio:.2f}x torch's own"
        console.print(f"{row.case} {row.output}: {row.status} ({said})", highlight=False)
        if log is not None:
            log.append({**dataclasses.asdict(row), "ratio": row.ratio})

    try:
        rows = run_cases(cases, on_row=on_row)
    finally:
        if log is not None:
            log.close()
    console.print(table([row for row in rows if row.status != "unsupported"]))
    unsupported = sum(row.status == "unsupported" for row in rows)
    if unsupported:
        console.print(f"[dim]{unsupported} case(s) unsupported here (reasons above and in --csv)[/dim]")
    ok = passed(rows)
    console.print("[green]all checks passed[/]" if ok else "[red]some checks FAILED[/]")
    return ok
