"""The `attnbench` command line: thin Typer commands that hand over to one function each.

Heavy imports (torch, triton, seaborn) happen inside the commands, so `--help` is instant.
Bad input raises attnbench.errors.InputError (or UnknownNameError) and becomes one line, exit 2.

List options take several values after one flag (`--seq 512 1024`), repeated flags or commas
(`--seq 512,1024`, `--seq=512,1024`), in every command: commands with list options use
``cls=ListOptionsCommand``.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import click
import typer
from typer.core import TyperCommand, TyperGroup

from attnbench.errors import USER_ERRORS, InputError, Interrupted


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


@contextmanager
def _one_line_errors():
    """Our input errors and click's parse errors (a malformed value, an unknown option or command)
    become one red line on stderr and exit code 2, instead of a traceback or typer's usage box.
    `attnbench` alone still prints the help. Interrupted (Ctrl-C in a run) prints its resume
    message and exits 130."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except USER_ERRORS as err:
        _fail(str(err))
    except click.UsageError as err:
        _fail(" ".join(err.format_message().split()))
    except Interrupted as err:  # Ctrl-C during a run: what was kept, and the command that continues it
        typer.echo(str(err), err=True)
        raise typer.Exit(130) from None


class InputErrorsExit2(TyperGroup):
    """Every command's input errors become one red line and exit code 2 (also under CliRunner)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        with _one_line_errors():  # `attnbench --bogus`
            return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context):
        with _one_line_errors():  # an unknown command, a command's parse errors and its input errors
            return super().invoke(ctx)


def _is_value(arg: str) -> bool:
    if not arg.startswith("-"):
        return True
    try:
        float(arg)  # a negative number is a value (to be refused with a clear message later)
        return True
    except ValueError:
        return False


def _split_values(text: str) -> list[str]:
    """`a,b` -> [a, b]; a comma inside brackets or quotes belongs to its value, so an --option
    KEY=VALUE whose value is a Python literal stays whole: `shape=(1, 2),name='x,y'` -> 2 values."""
    values, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [value.strip() for value in values if value.strip()]


class ListOptionsCommand(TyperCommand):
    """Rewrites `--seq 512 1024`, `--seq 512,1024` and `--seq=512,1024` into `--seq 512 --seq 1024`
    before click parses; a list flag left without any value stays bare, so click refuses it."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        lists = {opt for p in self.params if p.param_type_name == "option" and p.multiple for opt in p.opts}
        rewritten: list[str] = []
        current, bare = None, False  # the list flag whose values follow; True while it has none
        for arg in args:
            flag, _, text = arg.partition("=")
            if flag in lists:
                if bare:
                    rewritten.append(current)
                current, bare, values = flag, True, _split_values(text)
            elif current is not None and _is_value(arg):
                values = _split_values(arg)
            else:
                if bare:
                    rewritten.append(current)
                current, bare = None, False
                rewritten.append(arg)
                continue
            rewritten += [x for value in values for x in (current, value)]
            bare = bare and not values
        if bare:
            rewritten.append(current)
        config_file = _config_file(rewritten)
        if config_file is not None:  # the file's values become defaults: the command line overrides them
            from attnbench import config

            names = {p.name: p.param_type_name == "option" and p.multiple for p in self.params}
            ctx.default_map = {**(ctx.default_map or {}), **config.read(config_file, names)}
        return super().parse_args(ctx, rewritten)


def _config_file(args: list[str]) -> str | None:
    """The value of --config among ``args`` (the last one given), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--config="):
            found = arg.partition("=")[2]
    return found


app = typer.Typer(
    name="attnbench",
    help="Benchmark attention mechanisms: speed, memory and quality, side by side.",
    cls=InputErrorsExit2,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def mechanism_options(window: int | None, option: list[str]) -> dict:
    """--window and each --option KEY=VALUE (a Python literal, else a string) as one dict."""
    import ast

    given = {} if window is None else {"window": window}
    for item in option:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {item}: expected KEY=VALUE, e.g. topn=4")
        try:
            given[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            given[key.strip()] = text.strip()
    return given


SWEEP_OPTIONS = ("attn", "impl", "level", "mode", "seq", "batch", "tokens", "heads", "kv_heads", "head_dim",
                 "dtype", "causal", "bidirectional", "window", "positions", "option", "device", "preset", "max_call_ms", "check",
                 "context", "queries", "lengths", "seed")


@app.command(cls=ListOptionsCommand)
def speed(
    ctx: typer.Context,
    attn: Annotated[list[str], typer.Option(help="Mechanisms, or 'all'.")] = ["standard"],
    impl: Annotated[list[str], typer.Option(help="Impls, or 'all' (each mechanism runs those it has).")] = ["all"],
    level: Annotated[list[str], typer.Option(help="kernel (core on q, k, v), layer (with projections), model (a training step of --preset), model-graph (that step as a CUDA graph replay: GPU time without launch overhead).")] = ["kernel"],
    mode: Annotated[list[str], typer.Option(help="fwd, bwd (backward alone), fwdbwd over whole sequences; decode: one generation step against a KV cache or recurrent state of --context tokens (kernel level).")] = ["fwd", "bwd"],
    seq: Annotated[list[int], typer.Option(help="Sequence lengths T (--lengths replaces them).")] = [512, 1024, 2048, 4096, 8192, 16384],
    lengths: Annotated[list[str], typer.Option(help="Time one packed variable-length batch instead of --seq (FlashAttention's varlen layout, no padding; modes fwd, bwd, fwdbwd; kernel and layer levels): a list of lengths (the pack itself), uniform:LO-HI or file:PATH (one length a line), drawn with --seed until the pack holds --tokens (the last one cut to fit).")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed of the lengths --lengths uniform:LO-HI or file:PATH draws.")] = 0,
    context: Annotated[list[int], typer.Option(help="--mode decode: cache lengths L (tokens each sequence holds, the new ones included).")] = [],  # noqa: B006
    queries: Annotated[int, typer.Option(help="--mode decode: new tokens N per sequence a step (more than 1: chunked prefill, speculative verification).")] = 1,
    batch: Annotated[Optional[list[int]], typer.Option(help="Batch sizes B (instead of --tokens; decode: default 1).")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Fixed B*T budget, B = tokens // T; with --lengths uniform: or file:, the tokens of the pack (default: 16384 on CUDA, 2048 on CPU).")] = None,
    heads: Annotated[int, typer.Option(help="Query heads Hq.")] = 16,
    kv_heads: Annotated[Optional[int], typer.Option(help="Key/value heads Hkv (GQA) (default: heads).")] = None,
    head_dim: Annotated[int, typer.Option(help="Head dimension D.")] = 64,
    dtype: Annotated[Optional[list[str]], typer.Option(help="fp32, fp16, bf16 (default: bf16 on CUDA, fp32 on CPU).")] = None,
    causal: Annotated[bool, typer.Option("--causal", help="Causal cases (the default when neither is given).")] = False,
    bidirectional: Annotated[bool, typer.Option("--bidirectional", help="Bidirectional cases (both flags: both).")] = False,
    window: Annotated[Optional[int], typer.Option(help="Sliding window W: the W keys before each query plus the query (bidirectional: W each side too).")] = None,
    positions: Annotated[Optional[list[str]], typer.Option(help="Position schemes crossed with --attn: rope, alibi, none at every level, learned and sinusoidal at --level model (default: each mechanism's own); a cell without meaning is an unsupported row.")] = None,
    option: Annotated[list[str], typer.Option(help="Mechanism parameters KEY=VALUE (see `attnbench list`), for the mechanisms that declare them, e.g. compression=4 for bsbr.")] = [],  # noqa: B006
    preset: Annotated[str, typer.Option(help="Model preset of --level model and model-graph (tiny, small, base); GPT-style when causal, BERT-style otherwise.")] = "small",
    max_call_ms: Annotated[float, typer.Option(help="A case slower than this per call skips the longer sizes of its series (0: no limit).")] = 2000.0,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N (default: cuda when present).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: results/<YYYYmmdd-HHMMSS>-speed).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run (--out, or the latest): recorded cases are skipped.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of options (long names as keys, e.g. eval-every = 200); the command line overrides it. A run folder's config.toml repeats that run.")] = None,
    measure_peak: Annotated[bool, typer.Option("--measure-peak", help="Measure matmul TFLOP/s first; rows get % of peak.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Before timing each kernel-level case, check its impl against the torch definition (forward and gradients, float64 truth; T capped at 2048): the verdict goes in the row's check column, and a case that fails is an error row, not a time.")] = False,
    gpus: Annotated[int, typer.Option(help="Spread the cases over GPUs 0..N-1, one worker process each; rows as one GPU gives.")] = 1,
    profile: Annotated[int, typer.Option(help="After timing, profile each case that ran over N calls: top kernels, wall vs GPU-busy time (profile.csv).")] = 0,
    top: Annotated[int, typer.Option(help="Kernels shown per case with --profile.")] = 8,
) -> None:
    """Time attention mechanisms and impls over a sweep of sizes; one CSV row per case."""
    import torch
    from rich.markup import escape

    from attnbench import console
    from attnbench.config import of_invocation
    from attnbench.dtypes import resolve_dtype
    from attnbench.speed import lengths as packing, sweep
    from attnbench.errors import InputError
    from attnbench.models.registry import mechanisms
    from attnbench.speed.run import run_speed

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    if batch and tokens is not None:
        raise InputError("give --batch or --tokens, not both")
    if tokens is not None and not lengths:
        sweep.check_token_budget(tokens, seq)
    if profile < 0:
        raise InputError(f"--profile must be >= 0 calls, got {profile}")
    spec = sweep.SweepSpec(
        mechanisms=list(mechanisms()) if "all" in attn else attn,
        impls=None if "all" in impl else impl,
        levels=level,
        modes=mode,
        dtypes=[resolve_dtype(d) for d in (dtype or ["bf16" if on_cuda else "fp32"])],
        device=device,
        seqs=[] if lengths and ctx.get_parameter_source("seq").name == "DEFAULT" else seq,  # given with --lengths: refused
        batches=batch or None,
        tokens=None if batch or (tokens is None and lengths and not packing.parse(lengths).drawn)
        else (tokens if tokens is not None else 16384 if on_cuda else 2048),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=[c for c, given in ((True, causal), (False, bidirectional)) if given] or [True],
        window=window,
        positions=positions,
        options=mechanism_options(None, option),
        preset=preset,
        max_call_ms=max_call_ms or None,
        check=check,
        contexts=context,
        queries=queries,
        lengths=lengths,
        seed=seed,
    )
    spec_given = any(ctx.get_parameter_source(name).name in ("COMMANDLINE", "DEFAULT_MAP") for name in SWEEP_OPTIONS)
    run_dir, rows = run_speed(spec, out, resume, spec_given, measure_peak, console.sweep_progress, gpus, of_invocation(ctx.params))
    table, notes = console.speed_table(rows, title=f"{escape(str(run_dir))}  (median ms; ★ fastest, ≈ within its p20-p80)")
    console.out.print(table)
    for note in notes:
        console.out.print(f"[dim]not run: {escape(note)}[/dim]")
    console.out.print(f"{console.status_counts(rows)} -> {escape(str(run_dir))}/speed.csv")
    if profile:
        from attnbench import store
        from attnbench.speed.profile import profile_ok_cases

        with store.run_lock(run_dir):  # the profiles are written into the run folder too
            for case_profile in profile_ok_cases(spec, rows, run_dir, profile):
                console.out.print(console.profile_table(case_profile, top))


@app.command(cls=ListOptionsCommand)
def report(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="Run folders (default: the latest run).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where report.md/.html and plots/ go (default: the run folder).")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(help="Impls the speedup tables divide by; the first also the speedup plots (default: sdpa, else torch).")] = None,
    target_loss: Annotated[Optional[float], typer.Option(help="Eval loss that training runs' steps to convergence count to (default: the worst final eval loss).")] = None,
) -> None:
    """Plots, report.md and a self-contained report.html from one or more runs."""
    from attnbench.report.render import render_report

    render_report(runs or [], out, baseline, target_loss)


@app.command()
def compare(
    base: Annotated[Path, typer.Argument(help="Baseline run folder (or its speed.csv).")],
    head: Annotated[Path, typer.Argument(help="Run folder to check against it.")],
    threshold: Annotated[float, typer.Option(help="Percent slower than base that counts as a regression.")] = 5.0,
) -> None:
    """Per-case latency ratio HEAD/BASE; exit code 1 when any case regressed."""
    from attnbench.speed.compare import compare_runs

    if compare_runs(base, head, threshold):
        raise typer.Exit(1)


@app.command()
def env(
    measure_peak: Annotated[bool, typer.Option("--measure-peak", help="Also measure matmul TFLOP/s and copy GB/s.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Device for --measure-peak (default: cuda when present).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """GPU, driver, clocks, power, versions and git state (what every run records in meta.json)."""
    import json

    import torch

    from attnbench import console
    from attnbench import env as environment
    from attnbench.speed.sweep import check_device

    info = environment.collect()
    peaks = None
    if measure_peak:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtypes = ["bf16"] if device.startswith("cuda") else ["fp32"]
        check_device(device, dtypes)
        peaks = environment.measure_peaks(device, dtypes)
    if as_json:
        typer.echo(json.dumps({**info, "peaks": peaks}, indent=2, default=str))
    else:
        console.out.print(console.env_table(info, peaks))


@app.command("list")
def list_mechanisms(
    params: Annotated[bool, typer.Option("--params", help="Parameter counts per model preset and mechanism, per component.")] = False,
    task: Annotated[str, typer.Option(help="With --params: mlm (BERT-style) or clm (GPT-style).")] = "mlm",
) -> None:
    """Mechanisms x impls, with what is available on this machine and why not."""
    from rich.markup import escape

    from attnbench import console
    from attnbench.catalog import availability, describe

    if params:
        import pandas as pd

        from attnbench.train.run import param_table

        rows = pd.DataFrame(param_table(task=task))
        counts = [c for c in rows.columns if c not in ("preset", "mechanism", "task", "message")]
        rows[counts] = rows[counts].map(lambda n: "" if pd.isna(n) else f"{n / 1e6:.3f}M")
        console.out.print(console.frame_table(rows, f"parameters per component ({task}; tied weights counted once)",
                                              keep=("preset", "mechanism", "total", "message")))
        return
    entries = describe()
    console.out.print(console.mechanisms_table(entries))
    console.out.print(console.params_table(entries))
    for reason, impls in availability(entries).items():
        console.out.print(f"[dim red]{', '.join(impls)}[/dim red]: {escape(reason)}")


@app.command(cls=ListOptionsCommand)
def check(
    attn: Annotated[list[str], typer.Option(help="Mechanisms whose impls are checked, or all.")] = ["standard", "rope", "alibi", "window"],
    impl: Annotated[Optional[list[str]], typer.Option(help="Impls checked (default: every impl but the torch definition they are checked against).")] = None,
    positions: Annotated[Optional[list[str]], typer.Option(help="Position schemes crossed with --attn (rope, alibi, none; default: each mechanism's own).")] = None,
    window: Annotated[Optional[int], typer.Option(help="Sliding window W (the W keys before each query plus the query) for the mechanisms that take one.")] = None,
    max_seq: Annotated[int, typer.Option(help="Longest sequence T checked (also 1k, 1037 and powers of 4 from 4k).")] = 16384,
    dtype: Annotated[str, typer.Option(help="bf16 or fp16.")] = "bf16",
    device: Annotated[Optional[str], typer.Option(help="cuda (default when present) or cpu (give a small --max-seq).")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="Also write every row to this CSV as it is measured.")] = None,
) -> None:
    """Every impl of each mechanism against its plain-torch definition (float64 truth, FlashAttention's tolerance rule), forward and every gradient; exit 1 on a failure."""
    from attnbench import console
    from attnbench.devtools.check import run_check

    if not run_check(attn, max_seq, dtype, console.out, csv, impls=impl, positions=positions, window=window, device=device):
        raise typer.Exit(1)


@app.command(cls=ListOptionsCommand)
def distill(
    ctx: typer.Context,
    teacher: Annotated[str, typer.Option(help="A run folder of `attnbench train`, or a transformers model path / HF cache name (fetched only with --download).")],
    student: Annotated[list[str], typer.Option(help="Mechanisms to swap in for the teacher's attention, one student each.")],
    teacher_attn: Annotated[Optional[str], typer.Option(help="Which mechanism of a multi-mechanism train run is the teacher (default: its first).")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per student.")] = 200,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (linear warmup over 10% of the steps, at most 100, then cosine decay to 10%).")] = 2e-4,
    temperature: Annotated[float, typer.Option(help="Softmax temperature T of the KL(P_teacher || P_student) loss (scaled by T^2).")] = 1.0,
    layer_mse: Annotated[float, typer.Option(help="Weight of the per-layer attention-output MSE (LoLCATs-style layer-wise distillation).")] = 0.0,
    mask_l1: Annotated[list[float], typer.Option(help="Weights of the L1 penalty on learned masks (students with sparsity_penalty(), e.g. learned): one student per weight.")] = [0.0],  # noqa: B006
    mask_lr: Annotated[float, typer.Option(help="Peak learning rate of the learned masks' scorers (their gates start open and must cross the threshold within the run).")] = 1e-2,
    mask_freeze: Annotated[float, typer.Option(help="Fraction of the steps after which the learned masks stop learning (the rest of the attention adapts to a fixed pattern).")] = 0.5,
    train_all: Annotated[bool, typer.Option("--train-all", help="Train every parameter, not only the attention.")] = False,
    eval_every: Annotated[int, typer.Option(help="Held-out evaluation and checkpoint every N steps.")] = 50,
    eval_batches: Annotated[int, typer.Option(help="Held-out batches per evaluation.")] = 8,
    impl: Annotated[list[str], typer.Option(help="Impl of the students' mechanisms, or auto (triton, sdpa, chunked, torch: first that runs); MECHANISM=IMPL entries set one student's, e.g. auto nsa=torch.")] = ["auto"],
    batch: Annotated[Optional[int], typer.Option(help="Batch size (default: the teacher run's; 8 for transformers models).")] = None,
    seq: Annotated[Optional[int], typer.Option(help="Sequence length (default: the teacher run's; 128 for transformers models).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the students' new parameters and of sampled generations.")] = 0,
    window: Annotated[Optional[int], typer.Option(help="Sliding window W of the students that take one (window, nsa): the W keys before each query plus the query (default: the mechanism's).")] = None,
    option: Annotated[list[str], typer.Option(help="Mechanism parameters KEY=VALUE (see `attnbench list`), for the mechanisms that declare them; a comma inside a literal, e.g. (1, 2), stays in its value.")] = [],  # noqa: B006
    data: Annotated[Optional[str], typer.Option(help="Corpus to distil on: stdlib, wikitext-2, wikitext-103 (local or HF cache; --download to fetch), or a text file or folder (default: the teacher run's corpus; stdlib for transformers teachers).")] = None,
    positions: Annotated[Optional[list[str]], typer.Option(help="Position schemes crossed with --student: learned, sinusoidal, rope, alibi, none (default: the teacher's, or a student's own); a cell that has no meaning is an unsupported row with its reason.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts to continue: a text file, prompts separated by lines holding only --- (default: four code and prose openings).")] = None,
    scale_seq: Annotated[Optional[list[int]], typer.Option(help="Lengths one attention layer of the teacher and of each student is timed at (default: 1024 4096 16384 on CUDA, 256 1024 on CPU).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="The students' key/value heads (GQA; 1: MQA), a divisor of the teacher's heads; the teacher's k/v projections are mean-pooled per group (default: the teacher's).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: results/<YYYYmmdd-HHMMSS>-distill).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run (--out, or the latest) from each student's last checkpoint.")] = False,
    download: Annotated[bool, typer.Option("--download", help="Allow fetching a transformers --teacher from the Hugging Face Hub (never otherwise).")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of options (long names as keys, e.g. eval-every = 200); the command line overrides it. A run folder's config.toml repeats that run.")] = None,
) -> None:
    """Swap a trained model's attention for cheaper mechanisms and distil them: KL(P_teacher || P_student)."""
    from attnbench import console
    from attnbench.config import of_invocation
    from attnbench.distill.run import StudentDiverged, run_distill
    from attnbench.distill.spec import DistillSpec
    from attnbench.train.run import resolve_device

    spec = DistillSpec(
        teacher=teacher, students=student, teacher_attn=teacher_attn, steps=steps, lr=lr, temperature=temperature,
        layer_mse=layer_mse, mask_l1=mask_l1, mask_lr=mask_lr, mask_freeze=mask_freeze, train_all=train_all, eval_every=eval_every, eval_batches=eval_batches,
        impl=",".join(impl), batch=batch, seq=seq, seed=seed, device=str(resolve_device(device)), options=mechanism_options(window, option),
        data=data, positions=positions, kv_heads=kv_heads, download=download, prompts=None if prompts is None else str(prompts),
        scale_seq=scale_seq,
    )
    try:
        run_dir = run_distill(spec, out, resume, options=of_invocation(ctx.params))
    except StudentDiverged as err:  # not bad input (exit 2): the run is written, a student in it failed
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1) from None
    console.out.print(f"distilled {', '.join(cell.name for cell in spec.cells())} -> {run_dir}/summary.csv, generations.md")


@app.command(cls=ListOptionsCommand)
def train(
    ctx: typer.Context,
    attn: Annotated[list[str], typer.Option(help="Mechanisms, or all; each trains an identical model on the identical token stream.")],
    task: Annotated[str, typer.Option(help="mlm (BERT-style encoder) or clm (GPT-style decoder).")] = "mlm",
    preset: Annotated[Optional[str], typer.Option(help="Model size: tiny, small (~30M) or base (BERT-base) (default: tiny on CPU, small on CUDA).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps per mechanism (default: at most 2 epochs of the corpus, and 2500 on CPU, 2000 on CUDA).")] = None,
    seq: Annotated[Optional[int], typer.Option(help="Training length in tokens (default: the preset's).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Sequences per step, over all GPUs (default: the preset's, halved while a default run would take under 1000 steps).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate; warmup then cosine to 10% (default: the preset's).")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Linear warmup steps (default: the preset's, at most a tenth of default-sized steps).")] = None,
    data: Annotated[str, typer.Option(help="stdlib (no network), wikitext-2, wikitext-103, or a text file or folder.")] = "stdlib",
    tokenizer: Annotated[str, typer.Option(help="bpe[:VOCAB] trained on the train split, bytes, or a tokenizer.json / HF folder.")] = "bpe",
    download: Annotated[bool, typer.Option("--download", help="Allow HF datasets to download WikiText (never otherwise).")] = False,
    impl: Annotated[list[str], typer.Option(help="Impl of the mechanisms, or auto (triton, sdpa, chunked, torch: first that runs); MECHANISM=IMPL entries set one mechanism's, e.g. auto nsa=torch.")] = ["auto"],
    positions: Annotated[Optional[list[str]], typer.Option(help="Position schemes crossed with --attn: learned, sinusoidal, rope, alibi, none (default: each mechanism's own); a cell that has no meaning is an unsupported row with its reason.")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="Key/value heads (GQA; 1: MQA); a divisor of the preset's heads (default: as many as query heads).")] = None,
    target_loss: Annotated[Optional[float], typer.Option(help="Eval loss the report's steps to convergence count to (default: the worst final eval loss).")] = None,
    window: Annotated[Optional[int], typer.Option(help="Sliding window W of the mechanisms that declare one (window, nsa): the W keys before each query plus the query.")] = None,
    option: Annotated[list[str], typer.Option(help="Mechanism parameters KEY=VALUE (see `attnbench list`), for the mechanisms that declare them; a comma inside a literal, e.g. (1, 2), stays in its value.")] = [],  # noqa: B006
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    gpus: Annotated[int, typer.Option(help="Data-parallel processes (DDP, one per GPU; gloo on CPU).")] = 1,
    eval_every: Annotated[int, typer.Option(help="Validation, attention entropy and checkpoint every N steps.")] = 100,
    eval_batches: Annotated[int, typer.Option(help="Validation batches per evaluation.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the weights, the batch order and the MLM masks.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: results/<YYYYmmdd-HHMMSS>-train).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run (--out, or the latest) from its checkpoints.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML file of options (long names as keys, e.g. eval-every = 200); the command line overrides it. A run folder's config.toml repeats that run.")] = None,
) -> None:
    """Train identical models that differ only in their attention; learning curves, extrapolation, report."""
    from attnbench import console
    from attnbench.config import of_invocation
    from attnbench.models.registry import mechanisms
    from attnbench.train.run import TrainSpec, run_train

    spec = TrainSpec(
        attn=list(mechanisms()) if "all" in attn else attn, task=task, preset=preset, impl=",".join(impl),
        steps=steps, seq=seq, batch=batch, lr=lr, warmup=warmup, data=data, tokenizer=tokenizer, download=download,
        device=device, eval_every=eval_every, eval_batches=eval_batches, positions=positions, kv_heads=kv_heads, target_loss=target_loss, seed=seed, gpus=gpus,
        extra=mechanism_options(window, option),
    )
    run_dir = run_train(spec, out, resume, of_invocation(ctx.params))
    console.out.print(f"trained {', '.join(cell.name for cell in spec.cells())} -> {run_dir}/train.csv, train_report.md")


def main() -> None:
    """Console entry point: runs the app, turning input errors into one line and exit code 2."""
    try:
        app()
    except USER_ERRORS as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)
