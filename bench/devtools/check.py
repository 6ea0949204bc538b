"""`attnbench check`: every impl of every mechanism against the mechanism's plain-torch
definition, at real sizes on a GPU (or small ones on the CPU): the correctness gate.

A check is a table of named cases, each a kernel fn and a reference fn of the same inputs.
Every output and gradient is compared with FlashAttention's rule: the impl's error against a
float64 run of the reference must be at most 2x what the reference itself gets in the same low
precision (plus half an ulp of the largest value). The table shows that ratio per output. A
cell that cannot run (an impl missing here, a scheme a mechanism refuses) is a row of status
unsupported with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from attnbench import store
from attnbench.dtypes import DTYPES
from attnbench.errors import InputError
from attnbench.tolerance import error_bound

LOW_PRECISION = {name: DTYPES[name] for name in ("bf16", "fp16")}  # what the kernels are checked in
OUTPUT_NAMES = ("o", "dq", "dk", "dv")

@dataclass(frozen=True)
class CheckCase:
    """One named problem. ``inputs(generator)`` gives (q, k, v, do): the differentiable inputs
    in the low precision and the upstream gradient, made on ``device`` from the generator;
    kernel and reference map (q, k, v) -> o. ``unsupported``: why the case cannot run (then
    kernel, reference and inputs are None)."""

    name: str
    kernel: Callable[..., torch.Tensor] | None
    reference: Callable[..., torch.Tensor] | None
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]] | None
    device: str = "cuda"
    unsupported: str = ""


@dataclass(frozen=True)
class Measurement:
    """One output or gradient of one case; status ok | fail | oom | error."""

    case: str
    output: str
    kernel_error: float
    torch_error: float
    status: str
    message: str = ""

    @property
    def ratio(self) -> float:
        """Kernel error / torch's low-precision error (the rule allows ~2)."""
        if self.torch_error == 0:
            return 0.0 if self.kernel_error == 0 else math.inf
        return self.kernel_error / self.torch_error


def _output_and_grads(fn, inputs, do) -> list[torch.Tensor]:
    inputs = [x.detach().requires_grad_() for x in inputs]
    o = fn(*inputs)
    return [o.detach(), *torch.autograd.grad(o, inputs, do)]


def measure(case: CheckCase, seed: int = 0) -> list[Measurement]:
    """Kernel, float64 reference and low-precision reference on the same inputs and upstream
    gradient; one Measurement per output and gradient."""
    if case.unsupported:
        return [Measurement(case.name, "-", math.nan, math.nan, "unsupported", case.unsupported)]
    *inputs, do = case.inputs(torch.Generator(device=case.device).manual_seed(seed))
    dtype = inputs[0].dtype
    try:
        ours = _output_and_grads(case.kernel, inputs, do)
        plain = _output_and_grads(case.reference, inputs, do)
        exact = _output_and_grads(case.reference, [x.double() for x in inputs], do.double())
    except torch.cuda.OutOfMemoryError as err:
        return [Measurement(case.name, "-", math.nan, math.nan, "oom", str(err).splitlines()[0])]
    rows = []
    for name, mine, low, truth in zip(OUTPUT_NAMES, ours, plain, exact):
        kernel_error = (mine.double() - truth).abs().max().item()
        torch_error = (low.double() - truth).abs().max().item()
        ok = math.isfinite(kernel_error) and kernel_error <= error_bound(torch_error, truth.abs().max().item(), dtype)
        rows.append(Measurement(case.name, name, kernel_error, torch_error, "ok" if ok else "fail"))
    return rows


def run_cases(cases: Sequence[CheckCase], on_row: Callable[[Measurement], None] = lambda row: None) -> list[Measurement]:
    """Measure every case (a crash in one is a failed row, not a crashed check)."""
    rows = []
    for case in cases:
        try:
            measured = measure(case)
        except Exception as err:  # a kernel that raises is a failed check of that case
            measured = [Measurement(case.name, "-", math.nan, math.nan, "error", f"{type(err).__name__}: {err}")]
        for row in measured:
            on_row(row)
        rows.extend(measured)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


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


def passed(rows: Sequence[Measurement]) -> bool:
    """At least one case ran, and every case that could run passed."""
    ran = [row for row in rows if row.status != "unsupported"]
    return bool(ran) and all(row.status == "ok" for row in ran)


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


# layer options for the check where the initial values leave terms of the kernel inert
# (exposb starts with gamma = 0: its band filter, mu and sigma would go unchecked)
CHECK_OPTIONS = {"exposb": {"alpha": 0.3, "gamma": 0.5, "delta": 0.01}}


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
                        reason = _why_not(mechanism, scheme, dataclasses.replace(cfg, impl=impl), device, dtype)
                        if reason:
                            cases.append(CheckCase(name, None, None, None, device, reason))
                        else:
                            cases.append(_mechanism_case(name, mechanism, dataclasses.replace(cfg, impl=impl), seq, dtype, not causal, device))
    return cases


REFERENCE = "torch"  # every mechanism's definition in plain torch: what each impl is checked against


def _why_not(mechanism, scheme: str | None, cfg, device: str, dtype: torch.dtype) -> str | None:
    """Why ``cfg``'s impl of ``mechanism`` cannot be checked here, or None."""
    from attnbench.models import positions

    if REFERENCE not in mechanism.impls or mechanism.impls[REFERENCE].run is None:
        return f"{mechanism.name} has no kernel-level torch definition to check against"
    if mechanism.impls[cfg.impl].run is None:
        return f"{mechanism.name}/{cfg.impl} has no kernel-level core (layer level only)"
    if scheme in positions.EMBEDDED:
        return f"{scheme} positions are the model's embeddings, outside the attention core"
    reason = positions.why_not(mechanism, scheme) if scheme else None
    return reason or mechanism.why_not(cfg) or mechanism.impls[cfg.impl].why_not(cfg, device, dtype)


def _mechanism_case(name, mechanism, cfg, seq: int, dtype: torch.dtype, padded: bool, device: str = "cuda") -> CheckCase:
    """The layer's core (layer.attend: its scheme's rotation, options and parameters included)
    with ``cfg.impl`` against the same layer with the torch definition: both built from one
    seed, the second given the first's state, so random features and parameters agree."""
    from attnbench.models import registry

    torch.manual_seed(0)
    layer = registry.build_layer(mechanism.name, cfg).to(device)
    torch.manual_seed(0)
    reference = registry.build_layer(mechanism.name, dataclasses.replace(cfg, impl=REFERENCE)).to(device)
    reference.load_state_dict(layer.state_dict())
    seq_lens = torch.tensor([seq, seq * 3 // 4], device=device) if padded else None
    batch = 1 if seq_lens is None else len(seq_lens)

    def inputs(generator: torch.Generator):
        def randn(heads):
            return torch.randn(batch, seq, heads, cfg.head_dim, generator=generator, device=device).to(dtype)

        return randn(cfg.heads), randn(cfg.kv_heads), randn(cfg.kv_heads), randn(cfg.heads)

    def bind(module):
        def call(q, k, v):
            return module.to(q.dtype if q.dtype == torch.float64 else torch.float32).attend(q, k, v, seq_lens)

        return call

    return CheckCase(name, bind(layer), bind(reference), inputs, device)


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
