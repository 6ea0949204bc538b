"""The correctness gate: an impl of a mechanism against the mechanism's plain-torch definition
on the same inputs, forward and every gradient, by FlashAttention's rule (the impl's error
against a float64 run of the definition at most 2x the definition's own error in the same low
precision, plus half an ulp of the largest value: attnbench.tolerance.error_bound).

    CheckCase, measure(case) -> [Measurement]   one problem, one row per output and gradient
    layer_case(name, mechanism, cfg, ...)       a registry mechanism's core, cfg.impl vs torch
    why_not(mechanism, scheme, cfg, ...)        why a cell cannot be checked here, or None
    verdict(rows)                               one line for a speed.csv row: ok 1.02x / fail dq 3.1x

Used by `attnbench check` (bench/devtools/check.py: the matrix of sizes) and `speed --check`
(each case before it is timed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from attnbench.dtypes import DTYPES
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


def passed(rows: Sequence[Measurement]) -> bool:
    """At least one case ran, and every case that could run passed."""
    ran = [row for row in rows if row.status != "unsupported"]
    return bool(ran) and all(row.status == "ok" for row in ran)


# layer options for the check where the initial values leave terms of the kernel inert
# (exposb starts with gamma = 0: its band filter, mu and sigma would go unchecked)
CHECK_OPTIONS = {"exposb": {"alpha": 0.3, "gamma": 0.5, "delta": 0.01}}


REFERENCE = "torch"  # every mechanism's definition in plain torch: what each impl is checked against


def why_not(mechanism, scheme: str | None, cfg, device: str, dtype: torch.dtype, padded: bool = False) -> str | None:
    """Why ``cfg``'s impl of ``mechanism`` cannot be checked here (``padded``: with key padding), or None."""
    from attnbench.models import positions

    if REFERENCE not in mechanism.impls or mechanism.impls[REFERENCE].run is None:
        return f"{mechanism.name} has no kernel-level torch definition to check against"
    if mechanism.impls[cfg.impl].run is None:
        return f"{mechanism.name}/{cfg.impl} has no kernel-level core (layer level only)"
    if scheme in positions.EMBEDDED:
        return f"{scheme} positions are the model's embeddings, outside the attention core"
    if padded and mechanism.impls[cfg.impl].no_padding:
        return mechanism.impls[cfg.impl].no_padding
    reason = positions.why_not(mechanism, scheme) if scheme else None
    return reason or mechanism.why_not(cfg) or mechanism.impls[cfg.impl].why_not(cfg, device, dtype)


def layer_case(name, mechanism, cfg, seq: int, dtype: torch.dtype, padded: bool, device: str = "cuda") -> CheckCase:
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
    # padded query rows are don't-care (a model reads no output there; with a window some see no
    # key at all, and impls differ on an empty softmax): every impl's output is zeroed there
    valid = None if seq_lens is None else (torch.arange(seq, device=device)[None, :] < seq_lens[:, None])[:, :, None, None]

    def inputs(generator: torch.Generator):
        def randn(heads):
            return torch.randn(batch, seq, heads, cfg.head_dim, generator=generator, device=device).to(dtype)

        return randn(cfg.heads), randn(cfg.kv_heads), randn(cfg.kv_heads), randn(cfg.heads)

    def bind(module):
        def call(q, k, v):
            o = module.to(q.dtype if q.dtype == torch.float64 else torch.float32).attend(q, k, v, seq_lens)
            return o if valid is None else torch.where(valid, o, torch.zeros((), dtype=o.dtype, device=o.device))

        return call

    return CheckCase(name, bind(layer), bind(reference), inputs, device)


def verdict(rows: Sequence[Measurement]) -> str:
    """The gate's result in one cell: 'ok 1.02x' (the worst ratio to torch's own error), 'fail dq
    3.1x' (the first output over its bound), or the status and message of a case that did not run."""
    ran = [row for row in rows if row.status in ("ok", "fail")]
    if not ran:
        return " ".join(f"{rows[0].status} {rows[0].message}".split()) if rows else ""
    failed = [row for row in ran if row.status == "fail"]
    if failed:
        return f"fail {failed[0].output} {failed[0].ratio:.3g}x"
    return f"ok {max(row.ratio for row in ran):.3g}x"
