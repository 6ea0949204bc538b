"""`attnbench train`: identical models that differ only in their attention, trained on the
identical token stream, evaluated and compared.

    results/<run>/meta.json           spec, env, corpus + tokenizer hashes, model configs, parameter counts
    results/<run>/train.csv           TRAIN_COLUMNS: one train row per step, one valid row per evaluation
    results/<run>/entropy.csv         ENTROPY_COLUMNS: attention entropy per layer at every evaluation
    results/<run>/extrapolation.csv   EXTRAPOLATION_COLUMNS: loss at L, 2L, 4L
    results/<run>/inference.csv       INFERENCE_COLUMNS: eval-mode forward tokens/s at L and 4L
    results/<run>/checkpoints/<cell>/ bench/checkpoint.py (<cell>: the mechanism, or attn+scheme for --positions)
    results/<run>/train_report.md, plots/*.png

Mechanisms train one after the other with the same seed: the batch of step s and every
weight outside the attention are the same for all of them. The learning rate, the batch and
the MLM mask are pure functions of the step, so a resumed run continues exactly. A mechanism
whose loss or gradient norm turns non-finite stops (an error row, its last good checkpoint
kept); the others still train, the report is rendered, and the run then exits with the error.
"""

from __future__ import annotations

import contextlib
import csv
import math
import shlex
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from attnbench import checkpoint, config, run_folder, store
from attnbench.errors import InputError, Interrupted
from attnbench.flops import train_flops_per_token
from attnbench.models import registry
from attnbench.models.presets import Preset
from attnbench.models.transformer import IGNORE, LanguageModel, ModelConfig, build_model, lm_loss, param_counts
from attnbench.train import data, distributed
from attnbench.train.columns import (
    ENTROPY_COLUMNS, ENTROPY_CSV, EXTRAPOLATION_COLUMNS, EXTRAPOLATION_CSV, INFERENCE_COLUMNS, INFERENCE_CSV, TRAIN_COLUMNS,
)
from attnbench.train.evaluate import attention_entropy, autocast, evaluate, extrapolation_rows, inference_rows
from attnbench.train.impl_choice import choose_impl, impl_per_mechanism
from attnbench.train.spec import Cell, TrainSpec


class TrainingDiverged(InputError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0.1 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_at(step: int, spec: TrainSpec) -> float:
    return spec.lr * lr_factor(step, spec.warmup, spec.steps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device on this machine")
    return device


def model_config(spec: TrainSpec, cell: Cell, vocab_size: int, device: torch.device) -> ModelConfig:
    """The model of ``cell`` (a mechanism and its position scheme) for this run, with the impl
    resolved for ``device``."""
    preset = Preset.from_name(spec.preset)
    mechanism = cell.attn
    window, options = registry.get(mechanism).split_options(spec.extra, cell.scheme)  # only the options it declares
    cfg = ModelConfig.for_task(
        spec.task, preset, vocab_size, mechanism, "torch", spec.seq,
        positions=cell.scheme, window=window, attention=options, kv_heads=spec.kv_heads,
    )
    cfg.impl = choose_impl(mechanism, impl_per_mechanism(spec.impl, spec.attn)[mechanism], cfg.layer_config(), device)
    return cfg


def param_table(presets: list[str] | None = None, mechanisms: list[str] | None = None, task: str = "mlm") -> list[dict[str, Any]]:
    """For `attnbench list --params`: one row per (preset, mechanism) with parameter counts per
    component (models/transformer.py param_counts) at the preset's BPE vocabulary, or why it cannot build."""
    from attnbench.models.presets import PRESETS

    rows = []
    for preset_name in presets or list(PRESETS):
        preset = Preset.from_name(preset_name)
        for name in mechanisms or list(registry.mechanisms()):
            row: dict[str, Any] = {"preset": preset_name, "mechanism": name, "task": task}
            try:
                with torch.device("meta"):  # shapes only: no memory, no init
                    model = build_model(preset, name, task=task)
                rows.append({**row, **param_counts(model), "message": ""})
            except ValueError as err:  # the mechanism cannot build this model (e.g. causal only)
                rows.append({**row, "message": str(err)})
    return rows


# ---- the training loop


def optimizer_for(model: LanguageModel, spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, norms or other vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.98), eps=1e-6)


@dataclass
class Run:
    """What every mechanism of one run shares: the folder, the data and the logs (rank 0 only)."""

    spec: TrainSpec
    run_dir: Path
    device: torch.device
    world: distributed.World
    tokenizer: data.Tokenizer
    streams: dict[str, torch.Tensor]


def _peak_mem_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def forward_backward(trained: torch.nn.Module, full: dict[str, torch.Tensor], world: distributed.World, device: torch.device):
    """This rank's share of one batch forward and backward; returns (loss, parts, count): the
    loss averaged over every labelled token of the whole batch, lm_loss's parts, and that count."""
    count = (full["labels"] != IGNORE).sum().item()  # over the whole batch, all ranks alike
    mine = {k: v[world.rank :: world.size].to(device) for k, v in full.items()}
    with autocast(device):
        parts = lm_loss(trained, mine["input_ids"], mine["labels"])
    # DDP averages gradients over ranks; scaling by world size makes it the global mean's gradient
    (parts.loss_sum * world.size / count).backward()
    loss = distributed.all_sum(parts.loss_sum.detach().float()).item() / count
    return loss, parts, count


def step_seconds(run: Run, cell: Cell) -> float:
    """Wall seconds of one training step of ``cell``'s model on this device, measured on a
    throwaway copy of its model: the second of two steps (the first pays for compilation and
    autotuning). The run's weights and RNG are untouched: train_cell seeds itself."""
    cfg = model_config(run.spec, cell, run.tokenizer.vocab_size, run.device)
    model = LanguageModel(cfg, run.spec.seed).to(run.device)
    optimizer = optimizer_for(model, run.spec)
    batches = data.Batches(run.streams["train"], run.spec.task, run.spec.seq, run.spec.batch, run.spec.seed, run.tokenizer)
    for step in range(2):
        tick = time.perf_counter()
        forward_backward(model, batches.at(step), run.world, run.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
    return time.perf_counter() - tick


def run_seconds(spec: TrainSpec, per_step: float, start: int = 0) -> float:
    """Estimated wall seconds of steps ``start`` to spec.steps at ``per_step`` seconds a step,
    with the evaluations (eval_batches forward passes every eval_every steps, a forward taken
    as a third of a training step)."""
    steps = spec.steps - start
    evaluations = steps // spec.eval_every + 1
    return per_step * (steps + evaluations * spec.eval_batches / 3)


def train_cell(run: Run, cell: Cell, logs: dict[str, store.RowLog] | None, progress, estimate: float | None = None) -> None:
    """Train one cell's model for spec.steps (from its checkpoint, if any), evaluating and
    checkpointing every eval_every steps, then measure length extrapolation (clm).
    ``estimate``: seconds a step is expected to take, for the progress bar before the first step."""
    spec, device, world = run.spec, run.device, run.world
    cfg = model_config(spec, cell, run.tokenizer.vocab_size, device)
    name, labels = cell.name, {"attn": cell.attn, "positions": cfg.positions}
    torch.manual_seed(spec.seed)
    model = LanguageModel(cfg, spec.seed).to(device)
    optimizer = optimizer_for(model, spec)
    ckpt_dir = run.run_dir / "checkpoints" / name
    start, state = 0, {}
    last = checkpoint.latest(ckpt_dir)
    if last is not None:
        state = checkpoint.load(last, model, optimizer)
        if state.get("config") != asdict(cfg):
            raise InputError(f"checkpoint {last} is of another model config; use a new --out")
        start = state["step"]
    trained = model
    if world.size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = data.Batches(run.streams["train"], spec.task, spec.seq, spec.batch, spec.seed, run.tokenizer)
    held_out = data.eval_batches(run.streams["valid"], spec.task, spec.seq, spec.batch, spec.eval_batches, run.tokenizer, spec.seed)
    if progress:
        eta = None if estimate is None else run_seconds(spec, estimate, start)
        task = progress.add_task(name, total=spec.steps, completed=start, first=start, estimate=eta, loss=float("nan"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter() - state.get("elapsed_s", 0.0)
    tokens_seen = state.get("tokens", 0)
    for step in range(start, spec.steps):
        tick = time.perf_counter()
        lr = lr_at(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = lr
        full = batches.at(step)
        loss, parts, count = forward_backward(trained, full, world, device)
        if not math.isfinite(loss):
            _stop_diverged(cell, f"loss is {loss}", step + 1, ckpt_dir, logs, loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip).item()
        if not math.isfinite(grad_norm):  # clipping would zero the step: the run would go on, frozen
            _stop_diverged(cell, f"the gradient norm is {grad_norm} (loss {loss:.4g})", step + 1, ckpt_dir, logs, loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        correct = distributed.all_sum(parts.correct.detach().float()).item()
        tokens_seen += full["input_ids"].numel()
        elapsed = time.perf_counter() - began
        row = {
            **labels, "step": step + 1, "split": "train", "loss": loss, "ppl": math.exp(min(loss, 700)),
            "accuracy": correct / count, "lr": lr, "tokens": tokens_seen,
            "tokens_per_s": full["input_ids"].numel() / (time.perf_counter() - tick), "grad_norm": grad_norm,
            "peak_mem_mib": _peak_mem_mib(device), "elapsed_s": elapsed, "status": "ok", "message": "",
        }
        if logs:
            logs["train"].append(row)
        if progress:
            progress.update(task, completed=step + 1, loss=loss)
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            state_now = {"tokens": tokens_seen, "elapsed_s": elapsed, "config": asdict(cfg)}
            _evaluate_and_save(run, cell, model, optimizer, held_out, step + 1, state_now, logs)
    if logs and not state.get("extrapolated"):
        for row in extrapolation_rows(model, spec, run.streams["test"], device, run.tokenizer):
            logs["extrapolation"].append(row)
        for row in inference_rows(model, spec, device):
            logs["inference"].append(row)
        final = checkpoint.latest(ckpt_dir)
        checkpoint.save(ckpt_dir, model, optimizer, {**checkpoint.read_state(final), "extrapolated": True})
    if logs:
        write_learned_parameters(model, name, run.run_dir)
    distributed.barrier()


LEARNED_COLUMNS = ["attn", "layer", "param", "head", "value"]


def write_learned_parameters(model: torch.nn.Module, name: str, run_dir: Path) -> Path | None:
    """learned-<name>.csv (name: the cell's, Cell.name): the per-head values of attention layers that expose
    ``learned_parameters() -> {name: [H]}`` (ExpoSB's seven), as trained; None when none do."""
    rows = [
        {"attn": name, "layer": layer, "param": param, "head": head, "value": value}
        for layer, module in enumerate(m for m in model.modules() if hasattr(m, "learned_parameters"))
        for param, values in module.learned_parameters().items()
        for head, value in enumerate(values.detach().float().cpu().tolist())
    ]
    if not rows:
        return None
    path = run_dir / f"learned-{name}.csv"
    with store.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, LEARNED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _stop_diverged(cell: Cell, what: str, step: int, ckpt_dir: Path, logs, loss: float) -> None:
    last_good = checkpoint.latest(ckpt_dir)
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    message = f"{cell.name}: {what} at step {step}; training stopped, {kept}"
    if logs:
        logs["train"].append({"attn": cell.attn, "positions": cell.scheme, "step": step, "split": "train", "loss": loss, "status": "error", "message": message})
    raise TrainingDiverged(message)


def _evaluate_and_save(run: Run, cell: Cell, model, optimizer, held_out, step: int, state: dict, logs) -> None:
    metrics = evaluate(model, held_out, run.device)
    if run.world.is_main:
        labels = {"attn": cell.attn, "positions": model.cfg.positions}
        logs["train"].append({
            **labels, "step": step, "split": "valid", "loss": metrics["loss"], "ppl": metrics["ppl"],
            "accuracy": metrics["accuracy"], "tokens": state["tokens"], "elapsed_s": state["elapsed_s"],
            "peak_mem_mib": _peak_mem_mib(run.device), "status": "ok", "message": "",
        })
        sample = held_out[0]["input_ids"][:2].to(run.device)
        for layer, (entropy, message) in enumerate(attention_entropy(model, sample)):
            status = "ok" if entropy is not None else "unsupported"
            logs["entropy"].append({**labels, "step": step, "layer": layer, "entropy": entropy, "status": status, "message": message})
        checkpoint.save(run.run_dir / "checkpoints" / cell.name, model, optimizer, {"step": step, **state})
    distributed.barrier()


# ---- the run


def open_run(spec: TrainSpec, out: Path | None, resume: bool) -> tuple[Path, dict[str, Any]]:
    """The run folder and its meta.json (not written yet: the caller holds the folder's lock
    first); on --resume the folder must hold a train run whose recorded spec equals ``spec``."""
    from attnbench import env

    run_dir, meta, _ = run_folder.open_run("train", spec, out, resume, run_folder.agreeing())
    if not resume:
        meta["env"] = env.collect()
    return run_dir, meta


def command_line(spec: TrainSpec) -> list[str]:
    """The `attnbench train` arguments that ask for ``spec``: every option that is not at its
    default, with --window and --option for the mechanism options."""
    defaults = TrainSpec(attn=[])
    args = ["train", "--attn", ",".join(spec.attn)]
    for f in fields(spec):
        value, flag = getattr(spec, f.name), "--" + f.name.replace("_", "-")
        if f.name in ("attn", "extra") or value == getattr(defaults, f.name):
            continue
        args += [flag] if value is True else [flag, ",".join(value) if isinstance(value, list) else str(value)]
    for key, value in spec.extra.items():
        args += ["--window", str(value)] if key == "window" else ["--option", f"{key}={value!r}"]
    return args


def resume_command(spec: TrainSpec, run_dir: Path) -> str:
    """The shell command that continues the run of ``spec`` (as the user asked for it) in ``run_dir``."""
    return shlex.join(["attnbench", *command_line(spec), "--out", str(run_dir), "--resume"])


def check_models_build(spec: TrainSpec, device: torch.device) -> None:
    """Every supported cell's model builds (shapes only, on the meta device) with spec's options: a
    bad option value, or a model a mechanism cannot be (e.g. causal only), is an InputError now,
    before any data is loaded or folder made; so is a run whose every cell is unsupported."""
    vocab = Preset.from_name(spec.preset).vocab  # the tokenizer's size is not known yet; shapes only
    cells = spec.cells()
    refused = {cell.name: cell.why_not() for cell in cells if cell.why_not()}
    if len(refused) == len(cells):
        raise InputError("nothing to train: " + "; ".join(f"{name}: {why}" for name, why in refused.items()))
    for cell in cells:
        if cell.name in refused:
            continue
        try:
            cfg = model_config(spec, cell, vocab, device)
            with torch.device("meta"):
                LanguageModel(cfg, spec.seed)
        except InputError:
            raise
        except ValueError as err:
            raise InputError(f"--attn {cell.name}: {err}") from None


def _keep_rows(path: Path, columns: list[str], keep) -> None:
    """Rewrite ``path`` with only the rows ``keep(row)`` accepts (temp file + rename)."""
    if not path.exists():
        return
    rows = [row for row in store.read_rows(path, columns) if keep(row)]
    with store.replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def prune_to_checkpoints(run_dir: Path, cells: list[Cell]) -> None:
    """Drop rows logged after each cell's last checkpoint (resuming repeats those steps) and the
    unsupported cells' rows (train_all writes them again)."""
    saved = {}
    for cell in cells:
        last = checkpoint.latest(run_dir / "checkpoints" / cell.name)
        saved[(cell.attn, cell.scheme)] = checkpoint.read_state(last) if last else {"step": 0}

    def reached(row) -> bool:
        return row["status"] != "unsupported" and int(row["step"]) <= saved[(row["attn"], row["positions"])]["step"]

    _keep_rows(run_dir / store.TRAIN_CSV, TRAIN_COLUMNS, reached)
    _keep_rows(run_dir / ENTROPY_CSV, ENTROPY_COLUMNS, lambda r: int(r["step"]) <= saved[(r["attn"], r["positions"])]["step"])
    for name, columns in ((EXTRAPOLATION_CSV, EXTRAPOLATION_COLUMNS), (INFERENCE_CSV, INFERENCE_COLUMNS)):  # written with "extrapolated"
        _keep_rows(run_dir / name, columns, lambda r: saved[(r["attn"], r["positions"])].get("extrapolated", False))


def describe_models(spec: TrainSpec, vocab_size: int, device: torch.device) -> dict[str, Any]:
    """Per cell (Cell.name): its model config, parameter counts per component and training FLOPs
    per token; for an unsupported cell, why."""
    described = {}
    for cell in spec.cells():
        if cell.why_not():
            described[cell.name] = {"unsupported": cell.why_not()}
            continue
        cfg = model_config(spec, cell, vocab_size, device)
        with torch.device("meta"):  # shapes only: no memory, no init
            model = LanguageModel(cfg, spec.seed)
        described[cell.name] = {"config": asdict(cfg), "params": param_counts(model), "train_flops_per_token": train_flops_per_token(model, spec.seq)}
    return described


MANY_EPOCHS = 4  # more passes over the train split than this: warn that the model will overfit


def epochs(spec: TrainSpec, train_tokens: int) -> float:
    """Passes over the train split that ``spec`` (resolved) makes: steps x batch x seq tokens."""
    return spec.steps * spec.batch * spec.seq / max(train_tokens, 1)


def run_train(spec: TrainSpec, out: Path | None = None, resume: bool = False, options: dict[str, Any] | None = None) -> Path:
    """Train every mechanism of ``spec`` into one run folder, then render its report; returns the folder.
    ``options``: the command's options (attnbench.config.of_invocation), kept as the run's config.toml.

    Everything the user gave is checked, and the data loaded, before the folder is made. The
    plan (preset, steps, tokens, time per step measured here) is printed before the first step.
    Ctrl-C raises Interrupted with the command that resumes the run.
    """
    asked = spec
    device = resolve_device(spec.device)
    spec = asked.resolved(device)
    world = distributed.from_environment()
    if world.size > 1 and out is None:
        raise InputError("under torchrun pass --out, so that every rank writes the same run folder")
    check_models_build(spec, device)
    corpus = data.load_corpus(spec.data, spec.download)
    tokenizer = data.load_tokenizer(spec.tokenizer, corpus, Preset.from_name(spec.preset).vocab)
    if spec.task == "mlm" and tokenizer.mask_id is None:
        raise InputError(f"tokenizer {tokenizer.name} has no mask token; use --task clm or another tokenizer")
    streams = data.token_streams(corpus, tokenizer)
    spec = asked.resolved(device, streams["train"].numel())
    run_dir, meta = open_run(spec, out, resume)
    with store.run_lock(run_dir) if world.is_main else contextlib.nullcontext():
        meta["corpus"] = {"name": corpus.name, "sha256": corpus.digest, "tokens": {s: t.numel() for s, t in streams.items()}}
        meta["epochs"] = epochs(spec, meta["corpus"]["tokens"]["train"])
        meta["tokenizer"] = {"name": tokenizer.name, "sha256": tokenizer.digest, "vocab_size": tokenizer.vocab_size}
        meta["models"] = describe_models(spec, tokenizer.vocab_size, device)
        estimates = None
        if world.is_main:
            if resume:
                prune_to_checkpoints(run_dir, spec.cells())
            else:
                config.keep(run_dir, meta, options)
            store.write_meta(run_dir, meta)
            announce(spec, meta, run_dir, device)
            if world.size == 1 and spec.gpus == 1:
                run = Run(spec, run_dir, device, world, tokenizer, streams)
                estimates = {cell.name: step_seconds(run, cell) for cell in spec.cells() if not cell.why_not()}
                announce_time(spec, estimates)
        diverged = None
        try:
            if spec.gpus > 1 and world.size == 1:
                distributed.spawn(spec.gpus, train_all, spec, run_dir, device, tokenizer, streams, None)
            else:
                train_all(spec, run_dir, device, tokenizer, streams, estimates)
        except TrainingDiverged as err:  # the report still shows every cell, the diverged one up to its last step
            diverged = err
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: every mechanism keeps its last checkpoint in {run_dir / 'checkpoints'}; "
                              f"continue with\n  {resume_command(asked, run_dir)}") from None
        if world.is_main:
            from attnbench.train.report import render_train_report

            meta["finished"] = store.now()
            store.write_meta(run_dir, meta)
            render_train_report([run_dir], run_dir, spec.target_loss)
    if diverged:
        raise diverged
    return run_dir


def announce(spec: TrainSpec, meta: dict[str, Any], run_dir: Path, device: torch.device) -> None:
    """Before the first step: the run folder and what will be trained, with the overfitting
    warning when the steps pass over the train split more than MANY_EPOCHS times."""
    from attnbench import console

    corpus, train_tokens = meta["corpus"]["name"], meta["corpus"]["tokens"]["train"]
    tokens = spec.steps * spec.batch * spec.seq
    console.err.print(f"run folder: {run_dir}")
    names = [cell.name for cell in spec.cells() if not cell.why_not()]
    console.err.print(f"training {', '.join(names)} ({spec.task}) on {device}: preset {spec.preset}, {spec.steps} steps "
                      f"x {spec.batch} x {spec.seq} tokens = {tokens:,} tokens, {meta['epochs']:.2f} epochs of {corpus}'s "
                      f"{train_tokens:,} train tokens", highlight=False)
    for cell in spec.cells():
        if cell.why_not():
            console.err.print(f"unsupported: {cell.name}: {cell.why_not()}", highlight=False)
    if meta["epochs"] > MANY_EPOCHS:
        console.err.print(f"[yellow]warning: {meta['epochs']:.1f} epochs of {corpus}'s train split: expect the validation loss "
                          "to rise (overfitting); give --data a larger corpus (wikitext-103 --download, a folder) or fewer --steps[/yellow]")


def announce_time(spec: TrainSpec, per_step: dict[str, float]) -> None:
    """The time the run will take at the step times measured on this device (step_seconds)."""
    from attnbench import console

    total = sum(run_seconds(spec, seconds) for seconds in per_step.values())
    each = ", ".join(f"{name} {seconds:.3g} s" if seconds >= 1 else f"{name} {seconds * 1e3:.3g} ms" for name, seconds in per_step.items())
    console.err.print(f"a step measured here takes {each}: about {console.clock(total)} in all", highlight=False)


def train_all(spec: TrainSpec, run_dir: Path, device: torch.device, tokenizer: data.Tokenizer,
              streams: dict[str, torch.Tensor], estimates: dict[str, float] | None) -> None:
    """Every cell in turn, in this process (one rank of the world, or the only one), an
    unsupported one as a train.csv row with its reason; ``estimates``: seconds a step of each,
    for the progress bars (None: unknown)."""
    from attnbench import console

    world = distributed.from_environment()
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    distributed.init(world, device)
    run = Run(spec, run_dir, device, world, tokenizer, streams)
    logs = None
    if world.is_main:
        logs = {
            "train": store.RowLog(run_dir / store.TRAIN_CSV, TRAIN_COLUMNS, resume=True),
            "entropy": store.RowLog(run_dir / ENTROPY_CSV, ENTROPY_COLUMNS, resume=True),
            "extrapolation": store.RowLog(run_dir / EXTRAPOLATION_CSV, EXTRAPOLATION_COLUMNS, resume=True),
            "inference": store.RowLog(run_dir / INFERENCE_CSV, INFERENCE_COLUMNS, resume=True),
        }
    diverged = []
    try:
        with console.train_progress(world.is_main) as progress:
            for cell in spec.cells():
                if cell.why_not():
                    if logs:
                        logs["train"].append({"attn": cell.attn, "positions": cell.positions, "step": 0, "split": "train",
                                              "status": "unsupported", "message": cell.why_not()})
                    continue
                try:
                    train_cell(run, cell, logs, progress, (estimates or {}).get(cell.name))
                except TrainingDiverged as err:  # recorded in train.csv; the other cells still train
                    diverged.append(str(err))
    finally:
        for log in (logs or {}).values():
            log.close()
        distributed.finish()
    if diverged:
        raise TrainingDiverged(" | ".join(diverged))
