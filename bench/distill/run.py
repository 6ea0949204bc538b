"""`attnbench distill`: keep a trained model, swap only its attention, and train the new
attention to reproduce the teacher's output distribution.

    loss = T^2 * KL(P_teacher^T || P_student^T)           (per labelled token, temperature T)
         + layer_mse * mean_l MSE(attn_l^student, attn_l^teacher)   (LoLCATs-style, real tokens)
         + mask_l1 * sum of the student layers' sparsity_penalty()   (learnable masks/selections)

Teachers (bench/distill/teachers.py): a run folder of `attnbench train` (RunTeacher) or a
transformers causal/masked LM by local path or HF cache (HFTeacher; from the Hub only with
``download``). A
student is the same model with every attention layer's mechanism replaced: for our models a
registry layer with the teacher's tensors copied wherever name and shape agree
(QKVAttention's fused qkv + out); for transformers models the model's own projections
feeding our core through AttentionInterface (models/hf_attention.py). Every parameter the
teacher had outside attention is frozen unless ``train_all``; attention and anything new (a
position table a mechanism needs) trains. Dropout is off in both models (the student learns
to match a deterministic teacher).

Run folder: meta.json, distill.csv (DISTILL_COLUMNS; step 0 is the zero-shot row),
summary.csv (cost and quality per student), generations.md/.json (bench/distill/evaluate.py),
students/<name>/ (the last checkpoint of each student, bench/checkpoint.py with trainable_only:
--resume continues from it).

A student whose loss turns NaN or inf stops as `train`'s mechanisms do: an error row naming its
last good checkpoint (or none), a summary row with status error; the other students still run,
everything is written, and run_distill then raises StudentDiverged (the CLI: one line, exit 1).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnbench import checkpoint, config, env, run_folder, store
from attnbench.distill.evaluate import evaluate, generations, kl_per_token, measure_cost, to_device, write_generations
from attnbench.distill.teachers import HFTeacher, RunTeacher, hf_offline
from attnbench.errors import InputError, Interrupted
from attnbench.models import positions, registry
from attnbench.train import data
from attnbench.train.evaluate import autocast
from attnbench.train.impl_choice import check_mechanism_options, choose_impl, impl_per_mechanism
from attnbench.train.run import lr_factor

DISTILL_CSV = store.DISTILL_CSV
SUMMARY_CSV = "summary.csv"
DISTILL_COLUMNS = [
    "student", "step", "split", "loss", "kl", "agreement", "ppl_student", "ppl_teacher",
    "layer_mse", "lr", "tokens_per_s", "elapsed_s", "status", "message",
]
SUMMARY_COLUMNS = [
    "model", "mechanism", "impl", "steps", "kl_zero_shot", "kl", "agreement", "ppl",
    "attn_flops", "forward_ms", "peak_mem_mib", "trainable_params", "status", "message",
]



@dataclass
class DistillSpec:
    """What one `attnbench distill` run does (the CLI's options)."""

    teacher: str
    students: list[str]
    teacher_attn: str | None = None  # which mechanism of a multi-mechanism train run; None: its first
    steps: int = 200
    lr: float = 2e-4  # the attention starts from the teacher's weights: a fine-tuning rate
    temperature: float = 1.0
    layer_mse: float = 0.0
    mask_l1: float = 0.0
    train_all: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    impl: str = "auto"
    batch: int | None = None  # None: the teacher's training batch
    seq: int | None = None  # None: the teacher's training length
    new_tokens: int = 40
    seed: int = 0
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)  # the students' mechanism options (window, topn, ...)
    data: str | None = None  # the corpus distilled on (train's --data names; None: the teacher run's, or stdlib)
    positions: str | None = None  # the students' position scheme (None: the teacher's, or the student's own)
    kv_heads: int | None = None  # the students' key/value heads (GQA/MQA; None: the teacher's)
    download: bool = False  # may a transformers teacher (or a train run's corpus) be fetched

    def validate(self) -> None:
        if not self.students:
            raise InputError("give at least one --student mechanism")
        if len(set(self.students)) != len(self.students):
            raise InputError(f"--student {','.join(self.students)}: each mechanism once (a student per name)")
        for name in self.students:
            registry.get(name)  # unknown: UnknownNameError with the valid names
        check_mechanism_options(self.students, self.options)
        impl_per_mechanism(self.impl, self.students)
        sizes = (("steps", self.steps), ("eval-every", self.eval_every), ("eval-batches", self.eval_batches),
                 ("batch", self.batch), ("seq", self.seq))  # batch, seq: None means the teacher's
        for option, value in sizes:
            if value is not None and value <= 0:
                raise InputError(f"--{option} must be positive, not {value}")
        if self.lr <= 0 or self.temperature <= 0:
            raise InputError("--lr and --temperature must be positive")
        if self.positions is not None:
            positions.check_scheme(self.positions)
        if self.kv_heads is not None and self.kv_heads <= 0:
            raise InputError(f"--kv-heads must be positive, not {self.kv_heads}")
        if self.layer_mse < 0 or self.mask_l1 < 0:
            raise InputError("--layer-mse and --mask-l1 are weights: 0 or more")
        if self.mask_l1 and not any(has_sparsity_penalty(name) for name in self.students):
            takers = ", ".join(name for name in registry.mechanisms() if has_sparsity_penalty(name))
            raise InputError(f"--mask-l1 weighs a student's sparsity penalty, and {', '.join(self.students)} define none (students that do: {takers})")


# ---- losses


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of attention outputs [B, T, C] over real (unpadded) tokens."""
    err = (student.float() - teacher.float()).square().mean(-1)  # (B, T)
    if seq_lens is None:
        return err.mean()
    real = torch.arange(err.shape[1], device=err.device)[None, :] < seq_lens.to(err.device)[:, None]
    return err[real].mean()


def has_sparsity_penalty(mechanism: str) -> bool:
    """Whether ``mechanism``'s layer defines ``sparsity_penalty()`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        layer = registry.build_layer(mechanism, registry.LayerConfig(dim=64, heads=4, causal=registry.get(mechanism).causal))
    return any(callable(getattr(m, "sparsity_penalty", None)) for m in layer.modules())


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


class StudentDiverged(RuntimeError):
    """A student's loss became NaN or inf; the message names the step and the last good checkpoint.
    Not an InputError: the input was fine, the run was not (the CLI exits 1, not 2)."""


# ---- the loop


def distill_student(source, mechanism: str, impl: str, spec: DistillSpec, run_dir: Path, log: store.RowLog) -> nn.Module:
    """Build the ``mechanism`` student on ``impl``, continue from its checkpoint if there is one,
    train it to ``spec.steps``, logging train and held-out rows every ``spec.eval_every`` steps
    (step 0: zero-shot). Returns the trained student; StudentDiverged (after its error row) if
    its loss turns non-finite."""
    device = spec.device
    torch.manual_seed(spec.seed)
    student = source.student(mechanism, impl).eval()  # eval: no dropout; gradients still flow
    attention = source.attention_names(student)
    freeze_teacher_parameters(student, {n for n, _ in source.model.named_parameters()}, attention, spec.train_all)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise InputError(f"{mechanism}: the student has nothing to train (no attention parameters); pass --train-all")
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, min(100, spec.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, spec.steps))
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
            parts = distill_loss(source, student, batch, spec, teacher_out, student_out)
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


def distill_loss(source, student, batch, spec: DistillSpec, teacher_out: OutputRecorder | None, student_out: OutputRecorder | None) -> dict[str, torch.Tensor]:
    """The loss of one batch and its parts (module docstring): loss, kl (at the temperature, times T^2), layer_mse."""
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
    if spec.mask_l1:
        penalty = sparsity_penalty(student)
        if penalty is not None:
            loss = loss + spec.mask_l1 * penalty
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
    if spec.options or student_overrides(spec):
        raise InputError("--window, --option, --positions and --kv-heads reach the students of an `attnbench train` teacher only; "
                         "transformers students keep the teacher's shape and each mechanism's defaults")
    if path.exists() and not (path / "config.json").exists():
        raise InputError(f"--teacher {path}: neither a run folder (no meta.json) nor a transformers model (no config.json)")
    return HFTeacher(spec.teacher, batch=spec.batch or 8, seq=spec.seq or 128, device=spec.device, download=spec.download,
                     corpus_name=spec.data or "stdlib")


def student_overrides(spec: DistillSpec) -> dict[str, Any]:
    """The ModelConfig fields the students take instead of the teacher's (--positions, --kv-heads)."""
    given = {"positions": spec.positions, "kv_heads": spec.kv_heads}
    return {key: value for key, value in given.items() if value is not None}


def student_impls(source, spec: DistillSpec) -> dict[str, str]:
    """Each student's impl on ``spec.device`` (--impl, or auto), for the teacher's layer shape; an
    InputError names a student that cannot run there or in that teacher."""
    requested = impl_per_mechanism(spec.impl, spec.students)
    impls = {name: choose_impl(name, requested[name], source.layer_config(name), spec.device) for name in spec.students}
    for name, impl in impls.items():
        source.check_student(name, impl)
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


def distill_into(run_dir: Path, meta: dict[str, Any], source, impls: dict[str, str], spec: DistillSpec, resume: bool) -> Path:
    """run_distill's work once its folder is locked: every student, the summary, the generations."""
    source.model.eval().requires_grad_(False)
    students: dict[str, nn.Module] = {}
    failed: dict[str, str] = {}  # mechanism -> why it stopped
    with store.RowLog(run_dir / DISTILL_CSV, DISTILL_COLUMNS, resume=resume) as log:
        for mechanism, impl in impls.items():
            try:
                students[mechanism] = distill_student(source, mechanism, impl, spec, run_dir, log)
            except StudentDiverged as err:  # recorded in distill.csv; the other students still run
                failed[mechanism] = str(err)
    rows = store.read_rows(run_dir / DISTILL_CSV, DISTILL_COLUMNS)
    write_summary(run_dir, source, impls, students, failed, rows, spec)
    models = {f"teacher ({source.mechanism})": source.model, **students}
    note = None
    if source.task == "clm":
        write_generations(run_dir, generations(source, models, spec.new_tokens, spec.seed, spec.device))
    else:
        note = "A masked LM does not generate left to right: no generations for this teacher."
        write_generations(run_dir, [], note)
    meta["finished"] = store.now()
    store.write_meta(run_dir, meta)
    if failed:
        raise StudentDiverged(f"{len(failed)} of {len(impls)} students diverged: {' | '.join(failed.values())}; see {run_dir / SUMMARY_CSV}")
    return run_dir


def write_summary(
    run_dir: Path, source, impls: dict[str, str], students: dict[str, nn.Module], failed: dict[str, str],
    rows: list[dict[str, str]], spec: DistillSpec,
) -> list[dict[str, Any]]:
    """summary.csv: the teacher and each student's cost (attention FLOPs, forward ms, peak MiB on
    one held-out batch) and quality (zero-shot and final held-out KL, agreement, perplexity). A
    ``failed`` student's row has status error, its reason, and the quality of its last good checkpoint."""
    probe = data.eval_batches(source.streams["valid"], source.task, source.seq, source.batch, 1, source.tokenizer, spec.seed)[0]
    valid = [r for r in rows if r["split"] == "valid"]
    teacher_ppl = valid[-1]["ppl_teacher"] if valid else None
    summary = [{
        "model": "teacher", "mechanism": source.mechanism, "impl": "", "steps": "", "kl": 0.0, "agreement": 1.0,
        "ppl": teacher_ppl, "trainable_params": "", "status": "ok",
        **measure_cost(source, source.model, source.mechanism, probe, spec.device),
    }]
    for mechanism, impl in impls.items():
        mine = sorted((r for r in valid if r["student"] == mechanism), key=lambda r: int(r["step"]))
        row = {
            "model": "student", "mechanism": mechanism, "impl": impl, "steps": mine[-1]["step"],
            "kl_zero_shot": mine[0]["kl"] if mine[0]["step"] == "0" else None, "kl": mine[-1]["kl"],
            "agreement": mine[-1]["agreement"], "ppl": mine[-1]["ppl_student"], "status": "ok",
        }
        if mechanism in failed:
            row.update(status="error", message=failed[mechanism])
        else:
            student = students[mechanism]
            row.update(trainable_params=sum(p.numel() for p in student.parameters() if p.requires_grad),
                       **measure_cost(source, student, mechanism, probe, spec.device))
        summary.append(row)
    (run_dir / SUMMARY_CSV).unlink(missing_ok=True)  # rewritten whole from distill.csv and fresh costs
    with store.RowLog(run_dir / SUMMARY_CSV, SUMMARY_COLUMNS) as out:
        for row in summary:
            out.append(row)
    return summary
