"""`attnbench train`: identical models that differ only in their attention, trained on the
identical token stream, evaluated and compared.

    results/<run>/meta.json           spec, env, corpus + tokenizer hashes, model configs, parameter counts
    results/<run>/train.csv           TRAIN_COLUMNS: one train row per step, one valid row per evaluation
    results/<run>/entropy.csv         ENTROPY_COLUMNS: attention entropy per layer at every evaluation
    results/<run>/extrapolation.csv   EXTRAPOLATION_COLUMNS (clm): loss at L, 2L, 4L
    results/<run>/checkpoints/<attn>/ bench/train/checkpoint.py
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
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from attnbench import store
from attnbench.errors import InputError
from attnbench.flops import train_flops_per_token
from attnbench.models import registry
from attnbench.models.presets import Preset
from attnbench.models.transformer import IGNORE, LanguageModel, ModelConfig, build_model, lm_loss, param_counts
from attnbench.train import checkpoint, data, distributed
from attnbench.train.columns import ENTROPY_COLUMNS, ENTROPY_CSV, EXTRAPOLATION_COLUMNS, EXTRAPOLATION_CSV, TRAIN_COLUMNS
from attnbench.train.evaluate import attention_entropy, autocast, evaluate, extrapolation_rows
from attnbench.train.impl_choice import choose_impl, impl_per_mechanism
from attnbench.train.spec import TrainSpec


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


def model_config(spec: TrainSpec, mechanism: str, vocab_size: int, device: torch.device) -> ModelConfig:
    """The model of ``mechanism`` for this run, with the impl resolved for ``device``."""
    preset = Preset.from_name(spec.preset)
    window, options = registry.get(mechanism).split_options(spec.extra)  # only the options it declares
    cfg = ModelConfig.for_task(
        spec.task, preset, vocab_size, mechanism, "torch", spec.seq,
        positions=spec.positions, window=window, attention=options,
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


def train_mechanism(run: Run, mechanism: str, logs: dict[str, store.RowLog] | None, progress) -> None:
    """Train one mechanism for spec.steps (from its checkpoint, if any), evaluating and
    checkpointing every eval_every steps, then measure length extrapolation (clm)."""
    spec, device, world = run.spec, run.device, run.world
    cfg = model_config(spec, mechanism, run.tokenizer.vocab_size, device)
    torch.manual_seed(spec.seed)
    model = LanguageModel(cfg, spec.seed).to(device)
    optimizer = optimizer_for(model, spec)
    ckpt_dir = run.run_dir / "checkpoints" / mechanism
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
    task = progress.add_task(mechanism, total=spec.steps, completed=start, loss=float("nan")) if progress else None
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
        count = (full["labels"] != IGNORE).sum().item()  # over the whole batch, all ranks alike
        mine = {k: v[world.rank :: world.size].to(device) for k, v in full.items()}
        with autocast(device):
            parts = lm_loss(trained, mine["input_ids"], mine["labels"])
        # DDP averages gradients over ranks; scaling by world size makes it the global mean's gradient
        (parts.loss_sum * world.size / count).backward()
        loss = distributed.all_sum(parts.loss_sum.detach().float()).item() / count
        if not math.isfinite(loss):
            _stop_diverged(mechanism, f"loss is {loss}", step + 1, ckpt_dir, logs, loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip).item()
        if not math.isfinite(grad_norm):  # clipping would zero the step: the run would go on, frozen
            _stop_diverged(mechanism, f"the gradient norm is {grad_norm} (loss {loss:.4g})", step + 1, ckpt_dir, logs, loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        correct = distributed.all_sum(parts.correct.detach().float()).item()
        tokens_seen += full["input_ids"].numel()
        elapsed = time.perf_counter() - began
        row = {
            "attn": mechanism, "step": step + 1, "split": "train", "loss": loss, "ppl": math.exp(min(loss, 700)),
            "accuracy": correct / count, "lr": lr, "tokens": tokens_seen,
            "tokens_per_s": full["input_ids"].numel() / (time.perf_counter() - tick), "grad_norm": grad_norm,
            "peak_mem_mib": _peak_mem_mib(device), "elapsed_s": elapsed, "status": "ok", "message": "",
        }
        if logs:
            logs["train"].append(row)
        if progress:
            progress.update(task, completed=step + 1, loss=loss)
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            _evaluate_and_save(run, model, optimizer, held_out, step + 1, {"tokens": tokens_seen, "elapsed_s": elapsed, "config": asdict(cfg)}, logs)
    if spec.task == "clm" and logs and not state.get("extrapolated"):
        for row in extrapolation_rows(model, spec, run.streams["test"], device):
            logs["extrapolation"].append(row)
        final = checkpoint.latest(ckpt_dir)
        checkpoint.save(ckpt_dir, model, optimizer, {**checkpoint.read_state(final), "extrapolated": True})
    if logs:
        write_learned_parameters(model, mechanism, run.run_dir)
    distributed.barrier()


LEARNED_COLUMNS = ["attn", "layer", "param", "head", "value"]


def write_learned_parameters(model: torch.nn.Module, mechanism: str, run_dir: Path) -> Path | None:
    """learned-<mechanism>.csv: the per-head values of attention layers that expose
    ``learned_parameters() -> {name: [H]}`` (ExpoSB's seven), as trained; None when none do."""
    rows = [
        {"attn": mechanism, "layer": layer, "param": name, "head": head, "value": value}
        for layer, module in enumerate(m for m in model.modules() if hasattr(m, "learned_parameters"))
        for name, values in module.learned_parameters().items()
        for head, value in enumerate(values.detach().float().cpu().tolist())
    ]
    if not rows:
        return None
    path = run_dir / f"learned-{mechanism}.csv"
    with store.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, LEARNED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _stop_diverged(mechanism: str, what: str, step: int, ckpt_dir: Path, logs, loss: float) -> None:
    last_good = checkpoint.latest(ckpt_dir)
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    message = f"{mechanism}: {what} at step {step}; training stopped, {kept}"
    if logs:
        logs["train"].append({"attn": mechanism, "step": step, "split": "train", "loss": loss, "status": "error", "message": message})
    raise TrainingDiverged(message)


def _evaluate_and_save(run: Run, model, optimizer, held_out, step: int, state: dict, logs) -> None:
    metrics = evaluate(model, held_out, run.device)
    if run.world.is_main:
        mechanism = model.cfg.mechanism
        logs["train"].append({
            "attn": mechanism, "step": step, "split": "valid", "loss": metrics["loss"], "ppl": metrics["ppl"],
            "accuracy": metrics["accuracy"], "tokens": state["tokens"], "elapsed_s": state["elapsed_s"],
            "peak_mem_mib": _peak_mem_mib(run.device), "status": "ok", "message": "",
        })
        sample = held_out[0]["input_ids"][:2].to(run.device)
        for layer, (entropy, message) in enumerate(attention_entropy(model, sample)):
            status = "ok" if entropy is not None else "unsupported"
            logs["entropy"].append({"attn": mechanism, "step": step, "layer": layer, "entropy": entropy, "status": status, "message": message})
        checkpoint.save(run.run_dir / "checkpoints" / mechanism, model, optimizer, {"step": step, **state})
    distributed.barrier()


# ---- the run


def open_run(spec: TrainSpec, out: Path | None, resume: bool) -> tuple[Path, dict[str, Any]]:
    """The run folder and its meta.json; on --resume the recorded spec must equal ``spec``."""
    from attnbench import env

    if resume:
        run_dir = out or store.latest_run(needs=(store.TRAIN_CSV,))
        meta = store.read_meta(run_dir)
        recorded = TrainSpec(**meta["spec"])
        changed = [f.name for f in fields(spec) if getattr(spec, f.name) != getattr(recorded, f.name)]
        if changed:
            raise InputError(f"--resume continues {run_dir} as recorded; these options differ: {', '.join(changed)}")
        meta["resumed"] = [*meta.get("resumed", []), store.now()]
        meta["finished"] = None
        return run_dir, meta
    run_dir = out or store.new_run_dir("train")
    if (run_dir / store.TRAIN_CSV).exists():
        raise InputError(f"{run_dir / store.TRAIN_CSV} exists; pass --resume to continue it or choose another --out")
    store.ensure_writable(run_dir)
    meta = {
        "schema_version": store.SCHEMA_VERSION, "kind": "train",
        "command": " ".join(["attnbench", *sys.argv[1:]]), "spec": asdict(spec),
        "env": env.collect(), "started": store.now(), "finished": None,
    }
    return run_dir, meta


def _keep_rows(path: Path, columns: list[str], keep) -> None:
    """Rewrite ``path`` with only the rows ``keep(row)`` accepts (temp file + rename)."""
    if not path.exists():
        return
    rows = [row for row in store.read_rows(path, columns) if keep(row)]
    with store.replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def prune_to_checkpoints(run_dir: Path, mechanisms: list[str]) -> None:
    """Drop rows logged after each mechanism's last checkpoint: resuming repeats those steps."""
    saved = {}
    for name in mechanisms:
        last = checkpoint.latest(run_dir / "checkpoints" / name)
        saved[name] = checkpoint.read_state(last) if last else {"step": 0}
    _keep_rows(run_dir / store.TRAIN_CSV, TRAIN_COLUMNS, lambda r: int(r["step"]) <= saved[r["attn"]]["step"])
    _keep_rows(run_dir / ENTROPY_CSV, ENTROPY_COLUMNS, lambda r: int(r["step"]) <= saved[r["attn"]]["step"])
    _keep_rows(run_dir / EXTRAPOLATION_CSV, EXTRAPOLATION_COLUMNS, lambda r: saved[r["attn"]].get("extrapolated", False))


def describe_models(spec: TrainSpec, vocab_size: int, device: torch.device) -> dict[str, Any]:
    """Per mechanism: its model config, parameter counts per component and training FLOPs per token."""
    described = {}
    for name in spec.attn:
        cfg = model_config(spec, name, vocab_size, device)
        with torch.device("meta"):  # shapes only: no memory, no init
            model = LanguageModel(cfg, spec.seed)
        described[name] = {"config": asdict(cfg), "params": param_counts(model), "train_flops_per_token": train_flops_per_token(model, spec.seq)}
    return described


MANY_EPOCHS = 4  # more passes over the train split than this: warn that the model will overfit


def epochs(spec: TrainSpec, train_tokens: int) -> float:
    """Passes over the train split that ``spec`` (resolved) makes: steps x batch x seq tokens."""
    return spec.steps * spec.batch * spec.seq / max(train_tokens, 1)


def run_train(spec: TrainSpec, out: Path | None = None, resume: bool = False) -> Path:
    """Train every mechanism of ``spec`` into one run folder, then render its report; returns the folder."""
    spec = spec.resolved()
    device = resolve_device(spec.device)
    world = distributed.from_environment()
    if world.size > 1 and out is None:
        raise InputError("under torchrun pass --out, so that every rank writes the same run folder")
    run_dir, meta = open_run(spec, out, resume)
    corpus = data.load_corpus(spec.data, spec.download)
    tokenizer = data.load_tokenizer(spec.tokenizer, corpus, Preset.from_name(spec.preset).vocab)
    streams = data.token_streams(corpus, tokenizer)
    if spec.task == "mlm" and tokenizer.mask_id is None:
        raise InputError(f"tokenizer {tokenizer.name} has no mask token; use --task clm or another tokenizer")
    meta["corpus"] = {"name": corpus.name, "sha256": corpus.digest, "tokens": {s: t.numel() for s, t in streams.items()}}
    train_tokens = meta["corpus"]["tokens"]["train"]
    meta["epochs"] = epochs(spec, train_tokens)
    meta["tokenizer"] = {"name": tokenizer.name, "sha256": tokenizer.digest, "vocab_size": tokenizer.vocab_size}
    meta["models"] = describe_models(spec, tokenizer.vocab_size, device)
    if world.is_main:
        if meta["epochs"] > MANY_EPOCHS:
            from attnbench import console

            console.err.print(f"[yellow]warning: {spec.steps} steps x {spec.batch} x {spec.seq} tokens are {meta['epochs']:.1f} epochs "
                              f"of {corpus.name}'s {train_tokens:,} train tokens: expect the validation loss to rise "
                              "(overfitting); give --data a larger corpus (wikitext-103 --download, a folder) or fewer --steps[/yellow]")
        if resume:
            prune_to_checkpoints(run_dir, spec.attn)
        store.write_meta(run_dir, meta)
    diverged = None
    try:
        if spec.gpus > 1 and world.size == 1:
            distributed.spawn(spec.gpus, train_all, spec, run_dir, device, tokenizer, streams)
        else:
            train_all(spec, run_dir, device, tokenizer, streams)
    except TrainingDiverged as err:  # the report still shows every mechanism, the diverged one up to its last step
        diverged = err
    if world.is_main:
        from attnbench.train.report import render_train_report

        meta["finished"] = store.now()
        store.write_meta(run_dir, meta)
        render_train_report([run_dir], run_dir)
    if diverged:
        raise diverged
    return run_dir


def train_all(spec: TrainSpec, run_dir: Path, device: torch.device, tokenizer: data.Tokenizer, streams: dict[str, torch.Tensor]) -> None:
    """Every mechanism in turn, in this process (one rank of the world, or the only one)."""
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
        }
    diverged = []
    try:
        with _progress(world.is_main) as progress:
            for mechanism in spec.attn:
                try:
                    train_mechanism(run, mechanism, logs, progress)
                except TrainingDiverged as err:  # recorded in train.csv; the other mechanisms still train
                    diverged.append(str(err))
    finally:
        for log in (logs or {}).values():
            log.close()
        distributed.finish()
    if diverged:
        raise TrainingDiverged(" | ".join(diverged))


@contextlib.contextmanager
def _progress(enabled: bool):
    """A rich progress bar per mechanism with the live training loss (stderr), or None."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield progress
