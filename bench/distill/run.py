"""`attnbench distill`: keep a trained model, swap only its attention, and train the new
attention to reproduce the teacher's output distribution.

    loss = T^2 * KL(P_teacher^T || P_student^T)           (per labelled token, temperature T)
         + layer_mse * mean_l MSE(attn_l^student, attn_l^teacher)   (LoLCATs-style, real tokens)
         + mask_l1 * sum of the student layers' sparsity_penalty()   (learnable masks/selections)

Teachers (bench/distill/teachers.py): a run folder of `attnbench train` (RunTeacher) or a
transformers causal/masked LM by local path or HF cache (HFTeacher; from the Hub only with
``download``). The students: bench/distill/spec.py (mechanisms x position schemes x mask
strengths). A student is the same model with every attention layer's mechanism replaced: for our models a
registry layer with the teacher's tensors copied wherever name and shape agree
(QKVAttention's fused qkv + out); for transformers models the model's own projections
feeding our core through AttentionInterface (models/hf_attention.py). Every parameter the
teacher had outside attention is frozen unless ``train_all``; attention and anything new (a
position table a mechanism needs) trains. Dropout is off in both models (the student learns
to match a deterministic teacher).

Run folder (bench/distill/columns.py): meta.json, distill.csv (step 0 is the zero-shot row;
a cell that cannot be trained: one row of status unsupported), summary.csv (cost and quality
per student), density.csv (learned masks), scale.csv (one layer timed at --scale-seq,
bench/distill/scale.py), generations.md/.json (bench/distill/generate.py), students/<name>/
(the last checkpoint of each student, bench/checkpoint.py with trainable_only: --resume
continues from it).

A student whose loss turns NaN or inf stops as `train`'s mechanisms do: an error row naming its
last good checkpoint (or none), a summary row with status error; the other students still run,
everything is written, and run_distill then raises StudentDiverged (the CLI: one line, exit 1).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnbench import checkpoint, config, env, run_folder, store
from attnbench.distill import edges, generate, scale
from attnbench.distill.columns import (
    DENSITY_COLUMNS, DENSITY_CSV, DISTILL_COLUMNS, DISTILL_CSV, SCALE_COLUMNS, SCALE_CSV, SUMMARY_COLUMNS, SUMMARY_CSV,
)
from attnbench.distill.evaluate import evaluate, kl_per_token, measure_cost, to_device
from attnbench.distill.spec import DistillSpec, StudentCell
from attnbench.distill.teachers import HFTeacher, RunTeacher, hf_offline
from attnbench.errors import InputError, Interrupted
from attnbench.train import data
from attnbench.train.evaluate import autocast
from attnbench.train.impl_choice import choose_impl, impl_per_mechanism
from attnbench.train.run import lr_factor

# ---- losses


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of attention outputs [B, T, C] over real (unpadded) tokens."""
    err = (student.float() - teacher.float()).square().mean(-1)  # (B, T)
    if seq_lens is None:
        return err.mean()
    real = torch.arange(err.shape[1], device=err.device)[None, :] < seq_lens.to(err.device)[:, None]
    return err[real].mean()


def sparsity_penalty(model: nn.Module) -> torch.Tensor | None:
    """Sum of ``sparsity_penalty()`` over the modules that define one (a mechanism's L1 on its
    learnable masks or selection logits), or None when no module has one."""
    terms = [m.sparsity_penalty() for m in model.modules() if callable(getattr(m, "sparsity_penalty", None))]
    return torch.stack(terms).sum() if terms else None


class OutputRecorder:
    """Forward hooks keeping the last output [B, T, C] of each given module (tuples: their first item)."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [m.register_forward_hook(self._keeper(i)) for i, m in enumerate(modules)]

    def _keeper(self, index: int):
        def keep(module, inputs, output):
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def freeze_teacher_parameters(student: nn.Module, teacher_names: set[str], attention_names: list[str], train_all: bool) -> None:
    """Freeze every parameter the teacher had outside attention (unless ``train_all``); attention
    layers (``attention_names`` prefixes) and parameters new to the student stay trainable."""
    for name, param in student.named_parameters():
        in_attention = any(name.startswith(prefix + ".") for prefix in attention_names)
        param.requires_grad = train_all or in_attention or name not in teacher_names


def parameter_groups(student: nn.Module, trainable: list[nn.Parameter], spec: DistillSpec) -> list[dict[str, Any]]:
    """AdamW's groups: the learned masks' scorers (layers' ``mask_parameters()``) at --mask-lr,
    until --mask-freeze of the steps (its own warmup and cosine over those), then 0; everything
    else trainable at --lr over all steps (empty groups left out)."""
    masks = {id(p) for m in student.modules() if callable(getattr(m, "mask_parameters", None)) for p in m.mask_parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in masks], "lr": spec.lr},
              {"params": [p for p in trainable if id(p) in masks], "lr": spec.mask_lr, "mask": True}]
    return [group for group in groups if group["params"]]


class StudentDiverged(RuntimeError):
    """A student's loss became NaN or inf; the message names the step and the last good checkpoint.
    Not an InputError: the input was fine, the run was not (the CLI exits 1, not 2)."""


# ---- the loop


def distill_student(source, cell: StudentCell, impl: str, spec: DistillSpec, run_dir: Path, log: store.RowLog) -> nn.Module:
    """Build the ``cell`` student on ``impl``, continue from its checkpoint if there is one,
    train it to ``spec.steps``, logging train and held-out rows every ``spec.eval_every`` steps
    (step 0: zero-shot). Returns the trained student; StudentDiverged (after its error row) if
    its loss turns non-finite."""
    device, mechanism = spec.device, cell.name
    torch.manual_seed(spec.seed)
    source = source.with_positions(cell.positions)
    student = source.student(cell.mechanism, impl).eval()  # eval: no dropout; gradients still flow
    attention = source.attention_names(student)
    freeze_teacher_parameters(student, {n for n, _ in source.model.named_parameters()}, attention, spec.train_all)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise InputError(f"{mechanism}: the student has nothing to train (no attention parameters); pass --train-all")
    groups = parameter_groups(student, trainable, spec)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, min(100, spec.steps // 10))
    frozen_from = round(spec.mask_freeze * spec.steps)  # the masks stop learning: q/k/v settle on a fixed pattern

    def schedule(group: dict[str, Any]):
        if group.get("mask"):
            return lambda s: lr_factor(s, warmup, frozen_from) if s < frozen_from else 0.0
        return lambda s: lr_factor(s, warmup, spec.steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(group) for group in groups])
    ckpt_dir = run_dir / "students" / mechanism
    last = checkpoint.latest(ckpt_dir)
    saved = checkpoint.load(last, student, optimizer, scheduler, trainable_only=True)["step"] if last else None  # its step
    start = saved or 0

    train = data.Batches(source.streams["train"], source.task, source.seq, source.batch, spec.seed, source.tokenizer)
    valid = data.eval_batches(source.streams["valid"], source.task, source.seq, source.batch, spec.eval_batches, source.tokenizer, spec.seed)
    recorded = {(row["student"], row["step"], row["split"]) for row in log.existing}
    if (mechanism, str(start), "valid") not in recorded:  # the zero-shot row, or one lost with a kill
        log.append({"student": mechanism, "step": start, "split": "valid", "status": "ok", **evaluate(source, student, valid, device)})

    modules = dict(source.model.named_modules()), dict(student.named_modules())
    teacher_out = OutputRecorder([modules[0][name] for name in attention]) if spec.layer_mse else None
    student_out = OutputRecorder([modules[1][name] for name in attention]) if spec.layer_mse else None
    sums, began, tokens = _zero_sums(), time.perf_counter(), 0
    try:
        for step in range(start, spec.steps):
            batch = to_device(train.at(step), device)
            parts = distill_loss(source, student, batch, spec, teacher_out, student_out, cell.mask_l1)
            if not torch.isfinite(parts["loss"]):
                _stop_diverged(mechanism, float(parts["loss"].detach()), step + 1, checkpoint.latest(ckpt_dir), saved, log)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            scheduler.step()
            for key, value in parts.items():
                sums[key] += float(value.detach())
            sums["n"] += 1
            tokens += batch["input_ids"].numel()
            done = step + 1
            if done % spec.eval_every == 0 or done == spec.steps:
                checkpoint.save(ckpt_dir, student, optimizer, {"step": done}, scheduler, trainable_only=True)
                saved = done
                elapsed = time.perf_counter() - began
                n = sums["n"]
                log.append({
                    "student": mechanism, "step": done, "split": "train", "loss": sums["loss"] / n, "kl": sums["kl"] / n,
                    "layer_mse": sums["layer_mse"] / n if spec.layer_mse else None, "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed, "status": "ok",
                })
                log.append({"student": mechanism, "step": done, "split": "valid", "status": "ok", **evaluate(source, student, valid, device)})
                sums, began, tokens = _zero_sums(), time.perf_counter(), 0
    finally:
        for recorder in (teacher_out, student_out):
            if recorder is not None:
                recorder.remove()
    return student


def _stop_diverged(mechanism: str, loss: float, step: int, last: Path | None, saved: int | None, log: store.RowLog) -> None:
    """The error row of a student whose loss is ``loss`` at ``step``, then StudentDiverged; both
    name its last good checkpoint (the folder ``last``, written at step ``saved``), or say that none was."""
    kept = f"its last good checkpoint is {last} (step {saved})" if last is not None else "no checkpoint was written yet"
    message = f"student {mechanism}: loss is {loss} at step {step}; it is left out, {kept}"
    log.append({"student": mechanism, "step": step, "split": "train", "loss": loss, "status": "error", "message": message})
    raise StudentDiverged(message)


def distill_loss(source, student, batch, spec: DistillSpec, teacher_out: OutputRecorder | None, student_out: OutputRecorder | None,
                 mask_l1: float = 0.0) -> dict[str, torch.Tensor]:
    """The loss of one batch and its parts (module docstring): loss, kl (at the temperature, times T^2),
    layer_mse; ``mask_l1``: the student's weight of its sparsity penalty."""
    t = spec.temperature
    with torch.no_grad(), autocast(spec.device):
        teacher_logits = source.logits(source.model, batch)
    with autocast(spec.device):
        student_logits = source.logits(student, batch)
    kl = kl_per_token(teacher_logits, student_logits, t).mean() * t**2  # T^2 keeps gradient sizes comparable across T
    loss, layer_mse = kl, torch.zeros(())
    if teacher_out is not None:
        seq_lens = batch.get("seq_lens")
        layer_mse = torch.stack([masked_mse(s, t_, seq_lens) for s, t_ in zip(student_out.outputs, teacher_out.outputs)]).mean()
        loss = loss + spec.layer_mse * layer_mse
    if mask_l1:
        penalty = sparsity_penalty(student)
        if penalty is not None:
            loss = loss + mask_l1 * penalty
    return {"loss": loss, "kl": kl.detach(), "layer_mse": layer_mse.detach()}


def _zero_sums() -> dict[str, float]:
    return {"loss": 0.0, "kl": 0.0, "layer_mse": 0.0, "n": 0}


# ---- the run


def load_teacher(spec: DistillSpec):
    """A RunTeacher for a run folder of `attnbench train`, else an HFTeacher for a transformers path
    or cache name; transformers and huggingface_hub stay offline unless ``spec.download``."""
    if not spec.download:
        hf_offline()  # before either is imported or called
    path = Path(spec.teacher).expanduser()
    if (path / store.META_JSON).exists():
        return RunTeacher.from_run(
            path, mechanism=spec.teacher_attn, batch=spec.batch, seq=spec.seq, device=spec.device, options=spec.options,
            download=spec.download, overrides=student_overrides(spec), corpus_name=spec.data,
        )
    if spec.options or student_overrides(spec) or spec.positions:
        raise InputError("--window, --option, --positions and --kv-heads reach the students of an `attnbench train` teacher only; "
                         "transformers students keep the teacher's shape and each mechanism's defaults")
    if path.exists() and not (path / "config.json").exists():
        raise InputError(f"--teacher {path}: neither a run folder (no meta.json) nor a transformers model (no config.json)")
    return HFTeacher(spec.teacher, batch=spec.batch or 8, seq=spec.seq or 128, device=spec.device, download=spec.download,
                     corpus_name=spec.data or "stdlib")


def student_overrides(spec: DistillSpec) -> dict[str, Any]:
    """The ModelConfig fields every student takes instead of the teacher's (--kv-heads; each
    cell's position scheme is its own: RunTeacher.with_positions)."""
    return {} if spec.kv_heads is None else {"kv_heads": spec.kv_heads}


def student_impls(source, spec: DistillSpec) -> dict[StudentCell, str | None]:
    """Each student's impl on ``spec.device`` (--impl, or auto), for the teacher's layer shape with
    its position scheme, or None for a cell its mechanism cannot take (StudentCell.why_not); an
    InputError names a student that cannot run there or in that teacher."""
    requested = impl_per_mechanism(spec.impl, spec.students)
    impls: dict[StudentCell, str | None] = {}
    for cell in spec.cells():
        if cell.why_not():
            impls[cell] = None
            continue
        cell_source = source.with_positions(cell.positions)
        impls[cell] = choose_impl(cell.mechanism, requested[cell.mechanism], cell_source.layer_config(cell.mechanism), spec.device)
        cell_source.check_student(cell.mechanism, impls[cell])
    return impls


def run_distill(spec: DistillSpec, out: Path | None = None, resume: bool = False, source=None,
                options: dict[str, Any] | None = None) -> Path:
    """Distil every student of ``spec`` from its teacher into a run folder (module docstring); returns it.
    The teacher and every student are checked before the folder is made (bad input leaves nothing).
    A diverged student is recorded and left out; after the others and the summary, StudentDiverged.

    ``source``: an already loaded teacher (tests); by default ``load_teacher(spec)``; ``options``:
    the command's options (attnbench.config.of_invocation), kept as the run's config.toml.
    """
    spec.validate()
    generate.read_prompts(spec.prompts)  # a bad file is an input error before anything runs
    torch.manual_seed(spec.seed)
    source = source or load_teacher(spec)
    impls = student_impls(source, spec)
    # a resumed run must distil the same teacher into the same students; --steps and the rest may change
    run_dir, meta, spec = run_folder.open_run("distill", spec, out, resume, run_folder.agreeing("teacher", "students"))
    store.ensure_writable(run_dir)
    meta["env"] = env.collect()
    with store.run_lock(run_dir):
        if not resume:
            config.keep(run_dir, meta, options)
        store.write_meta(run_dir, meta)
        try:
            return distill_into(run_dir, meta, source, impls, spec, resume)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: every student keeps its last checkpoint in {run_dir}; continue with\n"
                              f"  {meta['command']} --out {shlex.quote(str(run_dir))} --resume") from None


def distill_into(run_dir: Path, meta: dict[str, Any], source, impls: dict[StudentCell, str | None], spec: DistillSpec, resume: bool) -> Path:
    """run_distill's work once its folder is locked: every student, the summary, the densities,
    the generations, the layer timings at --scale-seq."""
    source.model.eval().requires_grad_(False)
    students: dict[StudentCell, nn.Module] = {}
    failed: dict[str, str] = {}  # student name -> why it stopped
    with store.RowLog(run_dir / DISTILL_CSV, DISTILL_COLUMNS, resume=resume) as log:
        done = {row["student"] for row in log.existing if row["status"] == "unsupported"}
        for cell, impl in impls.items():
            if impl is None:
                if cell.name not in done:
                    log.append({"student": cell.name, "step": 0, "split": "valid", "status": "unsupported", "message": cell.why_not()})
                continue
            try:
                students[cell] = distill_student(source, cell, impl, spec, run_dir, log)
            except StudentDiverged as err:  # recorded in distill.csv; the other students still run
                failed[cell.name] = str(err)
    rows = store.read_rows(run_dir / DISTILL_CSV, DISTILL_COLUMNS)
    prompts = generate.read_prompts(spec.prompts)
    texts = []
    if source.task == "clm":
        models = {f"teacher ({source.mechanism})": source.model, **{cell.name: model for cell, model in students.items()}}
        texts = generate.generations(source, models, prompts, spec.new_tokens, spec.seed, spec.device)
        generate.write_generations(run_dir, texts)
    else:
        generate.write_generations(run_dir, [], "A masked LM does not generate left to right: no generations for this teacher.")
    valid = data.eval_batches(source.streams["valid"], source.task, source.seq, source.batch, spec.eval_batches, source.tokenizer, spec.seed)
    kept = {cell: densities(student, source.with_positions(cell.positions), valid, spec.device) for cell, student in students.items()}
    write_summary(run_dir, source, impls, students, failed, rows, texts, valid, kept, spec)
    write_densities(run_dir, kept)
    write_scale(run_dir, source, impls, students, spec)
    meta["finished"] = store.now()
    store.write_meta(run_dir, meta)
    if failed:
        raise StudentDiverged(f"{len(failed)} of {len(students) + len(failed)} students diverged: {' | '.join(failed.values())}; see {run_dir / SUMMARY_CSV}")
    return run_dir


def write_summary(
    run_dir: Path, source, impls: dict[StudentCell, str | None], students: dict[StudentCell, nn.Module], failed: dict[str, str],
    rows: list[dict[str, str]], texts: list[dict[str, Any]], valid_batches: list[dict[str, torch.Tensor]],
    kept: dict[StudentCell, torch.Tensor | None], spec: DistillSpec,
) -> list[dict[str, Any]]:
    """summary.csv: the teacher and each student's cost (attention FLOPs, forward ms, peak MiB on
    one held-out batch), quality (zero-shot and final held-out KL, agreement, perplexity; the edge
    cases), the learned masks' density and the generations' metrics. A ``failed`` student's row has
    status error, its reason, and the quality of its last good checkpoint; an unsupported cell's, why."""
    probe, edge = valid_batches[0], edges.edge_batches(source, valid_batches, spec.seed)
    valid = [r for r in rows if r["split"] == "valid" and r["status"] == "ok"]
    teacher_ppl = valid[-1]["ppl_teacher"] if valid else None
    teacher_name = f"teacher ({source.mechanism})"
    summary = [{
        "model": "teacher", "student": "", "mechanism": source.mechanism, "impl": "", "steps": "", "kl": 0.0, "agreement": 1.0,
        "ppl": teacher_ppl, "trainable_params": "", "status": "ok", **generate.mean_metrics(texts, teacher_name),
        **measure_cost(source, source.model, source.mechanism, probe, spec.device),
    }]
    for cell, impl in impls.items():
        row = {"model": "student", "student": cell.name, "mechanism": cell.mechanism, "positions": cell.positions,
               "mask_l1": cell.mask_l1 if cell.mask_l1 else None, "impl": impl}
        if impl is None:
            summary.append({**row, "status": "unsupported", "message": cell.why_not()})
            continue
        mine = sorted((r for r in valid if r["student"] == cell.name), key=lambda r: int(r["step"]))
        row.update({
            "steps": mine[-1]["step"], "kl_zero_shot": mine[0]["kl"] if mine[0]["step"] == "0" else None, "kl": mine[-1]["kl"],
            "agreement": mine[-1]["agreement"], "ppl": mine[-1]["ppl_student"], "status": "ok",
        })
        if cell.name in failed:
            row.update(status="error", message=failed[cell.name])
        else:
            student, cell_source = students[cell], source.with_positions(cell.positions)
            row.update(trainable_params=sum(p.numel() for p in student.parameters() if p.requires_grad),
                       density=None if kept[cell] is None else float(kept[cell].mean()),
                       **generate.mean_metrics(texts, cell.name), **edge_metrics(cell_source, student, edge, spec.device),
                       **measure_cost(cell_source, student, cell.mechanism, probe, spec.device))
        summary.append(row)
    (run_dir / SUMMARY_CSV).unlink(missing_ok=True)  # rewritten whole from distill.csv and fresh costs
    with store.RowLog(run_dir / SUMMARY_CSV, SUMMARY_COLUMNS) as out:
        for row in summary:
            out.append(row)
    return summary


def edge_metrics(source, student: nn.Module, edge: dict[str, list[dict[str, torch.Tensor]]], device: str) -> dict[str, float]:
    """KL and top-1 agreement of ``student`` with the teacher on each edge case (bench/distill/edges.py)."""
    out = {}
    for case, batches in edge.items():
        result = evaluate(source, student, batches, device)
        out[f"kl_{case}"], out[f"agreement_{case}"] = result["kl"], result["agreement"]
    return out


def mask_layers(model: nn.Module) -> list[nn.Module]:
    """The attention layers of ``model`` that keep a learned mask (they define density())."""
    return [m for m in model.modules() if callable(getattr(m, "density", None))]


@torch.no_grad()
def densities(student: nn.Module, source, batches: list[dict[str, torch.Tensor]], device: str) -> torch.Tensor | None:
    """Fraction of causal key blocks each learned-mask layer keeps per head, averaged over the
    held-out ``batches`` (hard gates): float [layers, Hq], or None for a student without one."""
    layers = mask_layers(student)
    if not layers:
        return None
    total = None
    for batch in batches:
        with autocast(device):
            source.logits(student, to_device(batch, device))
        kept = torch.stack([layer.density().float().cpu() for layer in layers])
        total = kept if total is None else total + kept
    return total / len(batches)


def write_densities(run_dir: Path, kept: dict[StudentCell, torch.Tensor | None]) -> None:
    """density.csv: per learned-mask student, layer and head, the kept fraction on the held-out batches (``densities``)."""
    (run_dir / DENSITY_CSV).unlink(missing_ok=True)
    with store.RowLog(run_dir / DENSITY_CSV, DENSITY_COLUMNS) as out:
        for cell, fractions in kept.items():
            for layer, heads in enumerate([] if fractions is None else fractions.tolist()):
                for head, value in enumerate(heads):
                    out.append({"student": cell.name, "layer": layer, "head": head, "density": value})


def write_scale(run_dir: Path, source, impls: dict[StudentCell, str | None], students: dict[StudentCell, nn.Module], spec: DistillSpec) -> None:
    """scale.csv: the teacher's and each trained student's first attention layer timed at
    --scale-seq (bench/distill/scale.py), every row written as it is measured."""
    models = {"teacher": (source.mechanism, getattr(getattr(source.model, "cfg", None), "impl", ""), source.model)}
    models.update({cell.name: (cell.mechanism, impls[cell], student) for cell, student in students.items()})
    (run_dir / SCALE_CSV).unlink(missing_ok=True)
    with store.RowLog(run_dir / SCALE_CSV, SCALE_COLUMNS) as out:
        for row in scale.scale_rows(source, models, spec.scale_seq or scale.default_seq(spec.device), spec.device):
            out.append(row)
