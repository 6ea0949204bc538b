"""`attnbench distill`: keep a trained model, swap only its attention, and train the new
attention to reproduce the teacher's output distribution.

    loss = T^2 * KL(P_teacher^T || P_student^T)           (per labelled token, temperature T)
         + layer_mse * mean_l MSE(attn_l^student, attn_l^teacher)   (LoLCATs-style, real tokens)
         + mask_l1 * sum of the student layers' sparsity_penalty()   (learnable masks/selections)

Teachers: a run folder of `attnbench train` (RunTeacher) or a transformers causal/masked LM
by local path or HF cache (HFTeacher; never downloaded). A student is the same model with
every attention layer's mechanism replaced: for our models a registry layer with the
teacher's tensors copied wherever name and shape agree (QKVAttention's fused qkv + out);
for transformers models the model's own projections feeding our core through
AttentionInterface (bench/hf_attention.py). Every parameter the teacher had outside
attention is frozen unless ``train_all``; attention and anything new (a position table a
mechanism needs) trains. Dropout is off in both models (the student learns to match a
deterministic teacher).

Run folder: meta.json, distill.csv (DISTILL_COLUMNS; step 0 is the zero-shot row),
summary.csv (cost and quality per student), generations.md/.json, students/<name>.pt
(the last checkpoint of each student: --resume continues from it).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnbench import store
from attnbench.data import IGNORE
from attnbench.errors import InputError
from attnbench.mechanism_choice import check_mechanism_options, choose_impl, impl_per_mechanism
from attnbench.models import registry

DISTILL_CSV = store.DISTILL_CSV
SUMMARY_CSV = "summary.csv"
GENERATIONS = "generations"
DISTILL_COLUMNS = [
    "student", "step", "split", "loss", "kl", "agreement", "ppl_student", "ppl_teacher",
    "layer_mse", "lr", "tokens_per_s", "elapsed_s",
]
SUMMARY_COLUMNS = [
    "model", "mechanism", "impl", "steps", "kl_zero_shot", "kl", "agreement", "ppl",
    "attn_flops", "forward_ms", "peak_mem_mib", "trainable_params",
]
PROMPTS = [
    "def read_config(path):\n",
    "import os\nimport sys\n\n",
    "The following example shows how to",
    "class Queue:\n    \"\"\"",
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

    def validate(self) -> None:
        if not self.students:
            raise InputError("give at least one --student mechanism")
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
        if self.layer_mse < 0 or self.mask_l1 < 0:
            raise InputError("--layer-mse and --mask-l1 are weights: 0 or more")


# ---- losses and metrics


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P_teacher || P_student) [N] for logits [N, V], both softened by ``temperature``, in fp32."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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


class StudentDiverged(InputError):
    """A student's loss became NaN or inf; the message names the step and the last good checkpoint."""


# ---- teachers


class RunTeacher:
    """A model trained by `attnbench train` (LanguageModel), its tokenizer and token streams."""

    def __init__(self, model, tokenizer, streams: dict[str, torch.Tensor], *, batch: int, seq: int, label: str, options=None):
        from attnbench.models.transformer import LanguageModel

        if not isinstance(model, LanguageModel):
            raise InputError(f"{label} does not hold an attnbench LanguageModel")
        self.model, self.tokenizer, self.streams = model, tokenizer, streams
        self.task = "clm" if model.cfg.causal else "mlm"
        self.batch, self.seq, self.label = batch, seq, label
        self.options = options or {}  # the students' mechanism options (DistillSpec.options)
        self.mechanism = model.cfg.mechanism
        self.max_length = model.cfg.max_length

    @classmethod
    def from_run(
        cls, run_dir: Path, *, mechanism: str | None, batch: int | None, seq: int | None, device: str, options=None
    ) -> "RunTeacher":
        """The last checkpoint of ``mechanism`` (default: the run's first) in a run folder of `attnbench train`,
        with the run's own corpus and tokenizer (checked against the hashes it recorded)."""
        from attnbench import checkpoint, data
        from attnbench.models.presets import Preset
        from attnbench.models.transformer import LanguageModel, ModelConfig
        from attnbench.train import TrainSpec

        meta = store.read_meta(run_dir)
        if meta.get("kind") != "train" or "models" not in meta:
            raise InputError(f"--teacher {run_dir}: not a run folder of `attnbench train`")
        spec = TrainSpec(**meta["spec"])
        mechanism = mechanism or spec.attn[0]
        if mechanism not in meta["models"]:
            raise InputError(f"--teacher-attn {mechanism}: {run_dir} trained {', '.join(meta['models'])}")
        step_dir = checkpoint.latest(run_dir / "checkpoints" / mechanism)
        if step_dir is None:
            raise InputError(f"{run_dir} has no checkpoint of {mechanism} yet")
        cfg = ModelConfig(**meta["models"][mechanism]["config"])
        model = LanguageModel(cfg, spec.seed).to(device)
        checkpoint.load(step_dir, model)
        corpus = data.load_corpus(spec.data, spec.download)
        tokenizer = data.load_tokenizer(spec.tokenizer, corpus, Preset.from_name(spec.preset).vocab)
        if tokenizer.digest != meta["tokenizer"]["sha256"]:
            raise InputError(f"the tokenizer {tokenizer.name} found here is not the one {run_dir} trained with")
        streams = data.token_streams(corpus, tokenizer)
        return cls(model, tokenizer, streams, batch=batch or spec.batch, seq=seq or spec.seq, label=f"{run_dir}:{mechanism}", options=options)

    def attention_names(self, model: nn.Module) -> list[str]:
        return [f"trunk.blocks.{i}.attention" for i in range(len(model.trunk.blocks))]

    def model_config(self, mechanism: str, impl: str):
        """The teacher's ModelConfig with ``mechanism`` (and the run's options it declares)."""
        from dataclasses import replace

        window, options = registry.get(mechanism).split_options(self.options)
        return replace(self.model.cfg, mechanism=mechanism, impl=impl, window=window, attention=options)

    def layer_config(self, mechanism: str) -> registry.LayerConfig:
        return self.model_config(mechanism, self.model.cfg.impl).layer_config()

    def student(self, mechanism: str, impl: str) -> nn.Module:
        """The teacher's model with ``mechanism`` in every block, teacher tensors copied where name and shape agree."""
        from attnbench.models.transformer import LanguageModel

        student = LanguageModel(self.model_config(mechanism, impl), seed=0).to(next(self.model.parameters()).device)
        theirs = self.model.state_dict()
        mine = student.state_dict()
        shared = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
        student.load_state_dict(shared, strict=False)
        return student

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [N, V] at the N labelled positions of ``batch`` (the head never sees the others)."""
        hidden = model.trunk(batch["input_ids"], batch.get("seq_lens"))
        return model.head(hidden[batch["labels"] != IGNORE])

    def next_token_logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, t] -> logits [V] of the token after them."""
        return model(ids)[0, -1]

    def attention_flops(self, mechanism: str, batch: int, seq: int) -> float:
        return self.model.cfg.layers * registry.get(mechanism).flops(self.layer_config(mechanism), batch, seq)


class HFTeacher:
    """A transformers causal or masked LM from a local path or the HF cache (never downloaded);
    students run our cores through AttentionInterface (bench/hf_attention.py)."""

    def __init__(self, path: str, *, batch: int, seq: int, device: str):
        import transformers

        from attnbench import data

        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            masked = any(name.endswith("ForMaskedLM") for name in (config.architectures or []))
            auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
            self.model = auto.from_pretrained(path, local_files_only=True).to(device)
            tokenizer_file = transformers.utils.cached_file(path, "tokenizer.json", local_files_only=True)
        except (OSError, ValueError) as err:
            raise InputError(f"--teacher {path}: not a run folder, nor a transformers model on disk or in the HF cache ({str(err).splitlines()[0]})") from None
        self.task = "mlm" if masked else "clm"
        self.tokenizer = data.load_tokenizer(tokenizer_file, None, 0)
        self.streams = data.token_streams(data.load_corpus("stdlib"), self.tokenizer)
        self.batch, self.seq, self.label = batch, seq, path
        self.mechanism = "standard"  # HF's eager/sdpa attention is exact softmax attention
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        text = config.get_text_config()
        heads = text.num_attention_heads
        self._layers = text.num_hidden_layers
        self._shape = dict(
            dim=text.hidden_size, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, causal=self.task == "clm",
        )

    def attention_names(self, model: nn.Module) -> list[str]:
        from attnbench.hf_attention import CORE_ATTRIBUTE

        suffix = "." + CORE_ATTRIBUTE
        return [name.removesuffix(suffix) for name, _ in model.named_modules() if name.endswith(suffix)]

    def layer_config(self, mechanism: str) -> registry.LayerConfig:
        return registry.LayerConfig(**self._shape)

    def student(self, mechanism: str, impl: str) -> nn.Module:
        import copy

        from attnbench import hf_attention

        student = copy.deepcopy(self.model)
        student.set_attn_implementation(hf_attention.register(mechanism, impl))
        with torch.no_grad():  # the cores are created by the first forward
            student(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(student.parameters()).device))
        return student

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"]).logits[batch["labels"] != IGNORE]

    def next_token_logits(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits[0, -1]

    def attention_flops(self, mechanism: str, batch: int, seq: int) -> float:
        return self._layers * registry.get(mechanism).flops(self.layer_config(mechanism), batch, seq)


# ---- evaluation, cost, generations


@torch.no_grad()
def evaluate(source, student: nn.Module, batches: list[dict[str, torch.Tensor]], device: str) -> dict[str, float]:
    """Held-out KL(teacher || student) per token at temperature 1, top-1 agreement, and the
    perplexity of both on the labelled tokens of ``batches``."""
    totals = dict(kl=0.0, agree=0.0, nll_student=0.0, nll_teacher=0.0, count=0)
    for batch in batches:
        batch = _to(batch, device)
        with _autocast(device):
            teacher_logits = source.logits(source.model, batch).float()
            student_logits = source.logits(student, batch).float()
        targets = batch["labels"][batch["labels"] != IGNORE]
        totals["kl"] += kl_per_token(teacher_logits, student_logits).sum().item()
        totals["agree"] += (teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum().item()
        totals["nll_student"] += F.cross_entropy(student_logits, targets, reduction="sum").item()
        totals["nll_teacher"] += F.cross_entropy(teacher_logits, targets, reduction="sum").item()
        totals["count"] += targets.numel()
    n = max(totals["count"], 1)
    return {
        "kl": totals["kl"] / n,
        "agreement": totals["agree"] / n,
        "ppl_student": math.exp(totals["nll_student"] / n),
        "ppl_teacher": math.exp(totals["nll_teacher"] / n),
    }


def measure_cost(source, model: nn.Module, mechanism: str, batch: dict[str, torch.Tensor], device: str) -> dict[str, Any]:
    """Attention FLOPs (the registry's forward model, all layers) and the whole model's forward
    time (median ms) and peak memory (MiB, CUDA only) on one evaluation batch."""
    from attnbench import timing
    from attnbench.timing import peak_memory_mib

    batch = _to(batch, device)
    b, t = batch["input_ids"].shape

    @torch.no_grad()
    def forward():
        with _autocast(device):
            source.logits(model, batch)

    forward()  # warm-up: autotuning and caches stay out of the numbers
    dev = torch.device(device)
    return {
        "attn_flops": source.attention_flops(mechanism, b, t),
        "forward_ms": timing.measure(forward, dev).median_ms,
        "peak_mem_mib": peak_memory_mib(forward, dev),
    }


@torch.no_grad()
def generate(source, model: nn.Module, prompt: list[int], new_tokens: int, device: str, generator: torch.Generator | None) -> list[int]:
    """``new_tokens`` continuation ids of ``prompt``: greedy without ``generator``, else sampled
    from the softmax with it. No KV cache (every mechanism works); the context is cut to the
    model's longest input; stops after an eos."""
    ids = list(prompt)
    for _ in range(new_tokens):
        context = ids[-source.max_length :] if source.max_length else ids
        with _autocast(device):
            logits = source.next_token_logits(model, torch.tensor([context], device=device)).float()
        if generator is None:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        ids.append(token)
        if token == source.tokenizer.eos_id:
            break
    return ids[len(prompt) :]


def decode(tokenizer, ids: list[int]) -> str:
    """Token ids -> text (data.Tokenizer has no decode: bytes decode as UTF-8, BPE through its backend)."""
    if tokenizer.backend is None:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    return tokenizer.backend.decode(ids)


def generations(source, models: dict[str, nn.Module], new_tokens: int, seed: int, device: str) -> list[dict[str, Any]]:
    """Each prompt continued by each model, greedy and sampled; a sampled prompt uses the same
    seed for every model, so the texts differ only by the model."""
    rows = []
    prompts = source.tokenizer.encode_batch(PROMPTS)
    for index, (text, prompt) in enumerate(zip(PROMPTS, prompts)):
        for name, model in models.items():
            for mode in ("greedy", "sampled"):
                generator = None if mode == "greedy" else torch.Generator().manual_seed(seed + index)
                ids = generate(source, model, prompt, new_tokens, device, generator)
                rows.append({"prompt": text, "model": name, "mode": mode, "seed": seed + index if generator else None,
                             "text": decode(source.tokenizer, ids)})
    return rows


def write_generations(run_dir: Path, rows: list[dict[str, Any]], note: str | None = None) -> None:
    """generations.json (the rows) and generations.md (per prompt, each model's continuations)."""
    import json

    (run_dir / f"{GENERATIONS}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Generations", ""]
    if note:
        lines += [note, ""]
    for prompt in dict.fromkeys(row["prompt"] for row in rows):
        lines += [f"## Prompt: `{prompt!r}`", ""]
        for row in (r for r in rows if r["prompt"] == prompt):
            seed = f", seed {row['seed']}" if row["seed"] is not None else ""
            lines += [f"**{row['model']}** ({row['mode']}{seed})", "", "```", prompt + row["text"], "```", ""]
    (run_dir / f"{GENERATIONS}.md").write_text("\n".join(lines))


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _autocast(device: str):
    """bf16 autocast on CUDA (fp32 master weights), nothing on CPU."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


# ---- the loop


def distill_student(source, mechanism: str, spec: DistillSpec, run_dir: Path, log: store.RowLog) -> tuple[nn.Module, str]:
    """Build the ``mechanism`` student, continue from its checkpoint if there is one, train it to
    ``spec.steps``, logging train and held-out rows every ``spec.eval_every`` steps (step 0:
    zero-shot). Returns the trained student and the impl it ran."""
    from attnbench import data
    from attnbench.train import lr_factor

    device = spec.device
    impl = choose_impl(mechanism, impl_per_mechanism(spec.impl, spec.students)[mechanism], source.layer_config(mechanism), device)
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
    checkpoint = run_dir / "students" / f"{mechanism}.pt"
    start = load_checkpoint(checkpoint, student, optimizer, scheduler) if checkpoint.exists() else 0

    train = data.Batches(source.streams["train"], source.task, source.seq, source.batch, spec.seed, source.tokenizer)
    valid = data.eval_batches(source.streams["valid"], source.task, source.seq, source.batch, spec.eval_batches, source.tokenizer, spec.seed)
    recorded = {(row["student"], row["step"], row["split"]) for row in log.existing}
    if (mechanism, str(start), "valid") not in recorded:  # the zero-shot row, or one lost with a kill
        log.append({"student": mechanism, "step": start, "split": "valid", **evaluate(source, student, valid, device)})

    modules = dict(source.model.named_modules()), dict(student.named_modules())
    teacher_out = OutputRecorder([modules[0][name] for name in attention]) if spec.layer_mse else None
    student_out = OutputRecorder([modules[1][name] for name in attention]) if spec.layer_mse else None
    sums, began, tokens = _zero_sums(), time.perf_counter(), 0
    try:
        for step in range(start, spec.steps):
            batch = _to(train.at(step), device)
            parts = distill_loss(source, student, batch, spec, teacher_out, student_out)
            if not torch.isfinite(parts["loss"]):
                raise StudentDiverged(
                    f"student {mechanism}: loss is {float(parts['loss'])} at step {step + 1}; it is left out, "
                    f"its last good checkpoint is {checkpoint} (step {step // spec.eval_every * spec.eval_every})"
                )
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
                save_checkpoint(checkpoint, student, optimizer, scheduler, done)
                elapsed = time.perf_counter() - began
                n = sums["n"]
                log.append({
                    "student": mechanism, "step": done, "split": "train", "loss": sums["loss"] / n, "kl": sums["kl"] / n,
                    "layer_mse": sums["layer_mse"] / n if spec.layer_mse else None, "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                })
                log.append({"student": mechanism, "step": done, "split": "valid", **evaluate(source, student, valid, device)})
                sums, began, tokens = _zero_sums(), time.perf_counter(), 0
    finally:
        for recorder in (teacher_out, student_out):
            if recorder is not None:
                recorder.remove()
    return student, impl


def distill_loss(source, student, batch, spec: DistillSpec, teacher_out: OutputRecorder | None, student_out: OutputRecorder | None) -> dict[str, torch.Tensor]:
    """The loss of one batch and its parts (module docstring): loss, kl (at the temperature, times T^2), layer_mse."""
    t = spec.temperature
    with torch.no_grad(), _autocast(spec.device):
        teacher_logits = source.logits(source.model, batch)
    with _autocast(spec.device):
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


def save_checkpoint(path: Path, student: nn.Module, optimizer, scheduler, step: int) -> None:
    """What a resumed student needs: its trainable parameters and every buffer (a performer's
    random features), the optimizer and schedule, the step. Frozen tensors come from the teacher."""
    import os

    tensors = {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}
    tensors.update({n: b for n, b in student.named_buffers()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "tensors": tensors, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, student: nn.Module, optimizer, scheduler) -> int:
    """Restore a student saved by save_checkpoint; returns its step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = set(state["tensors"]) - set(student.state_dict())
        if missing:
            raise InputError(f"{path} is from another student: {sorted(missing)[:3]}...")
        student.load_state_dict(state["tensors"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot resume from {path}: {str(err).splitlines()[0]}") from None


# ---- the run


def load_teacher(spec: DistillSpec):
    """A RunTeacher for a run folder of `attnbench train`, else an HFTeacher for a transformers path or cache name."""
    path = Path(spec.teacher).expanduser()
    if (path / store.META_JSON).exists():
        return RunTeacher.from_run(
            path, mechanism=spec.teacher_attn, batch=spec.batch, seq=spec.seq, device=spec.device, options=spec.options
        )
    if spec.options:
        raise InputError("--window and --option reach the students of an `attnbench train` teacher only; transformers students take each mechanism's defaults")
    if path.exists() and not (path / "config.json").exists():
        raise InputError(f"--teacher {path}: neither a run folder (no meta.json) nor a transformers model (no config.json)")
    return HFTeacher(spec.teacher, batch=spec.batch or 8, seq=spec.seq or 128, device=spec.device)


def run_distill(spec: DistillSpec, out: Path | None = None, resume: bool = False, command: str = "", source=None) -> Path:
    """Distil every student of ``spec`` from its teacher into a run folder (module docstring); returns it.

    ``source``: an already loaded teacher (tests); by default ``load_teacher(spec)``.
    """
    from attnbench import env

    spec.validate()
    torch.manual_seed(spec.seed)
    source = source or load_teacher(spec)  # before any folder is made: a bad --teacher leaves nothing behind
    run_dir = out or (store.latest_run(needs=(DISTILL_CSV,)) if resume else store.new_run_dir("distill"))
    store.ensure_writable(run_dir)
    meta = {"command": command, "schema_version": store.SCHEMA_VERSION, "kind": "distill", "spec": asdict(spec), "started": store.now()}
    if resume and (run_dir / store.META_JSON).exists():
        before = store.read_meta(run_dir)
        if {k: before["spec"].get(k) for k in ("teacher", "students")} != {"teacher": spec.teacher, "students": spec.students}:
            raise InputError(f"{run_dir} distilled {before['spec'].get('teacher')} into {before['spec'].get('students')}; resume it with the same --teacher and --student")
        meta["started"] = before.get("started", meta["started"])
    meta["env"] = env.collect()
    store.write_meta(run_dir, meta)
    source.model.eval().requires_grad_(False)

    students: dict[str, tuple[nn.Module, str]] = {}
    with store.RowLog(run_dir / DISTILL_CSV, DISTILL_COLUMNS, resume=resume) as log:
        for mechanism in spec.students:
            try:
                students[mechanism] = distill_student(source, mechanism, spec, run_dir, log)
            except StudentDiverged as err:  # the other students still run
                print(f"error: {err}", file=sys.stderr)
    rows = store.read_rows(run_dir / DISTILL_CSV, DISTILL_COLUMNS)
    write_summary(run_dir, source, students, rows, spec)
    models = {f"teacher ({source.mechanism})": source.model, **{name: model for name, (model, _) in students.items()}}
    note = None
    if source.task == "clm":
        write_generations(run_dir, generations(source, models, spec.new_tokens, spec.seed, spec.device))
    else:
        note = "A masked LM does not generate left to right: no generations for this teacher."
        write_generations(run_dir, [], note)
    meta["finished"] = store.now()
    store.write_meta(run_dir, meta)
    return run_dir


def write_summary(run_dir: Path, source, students: dict[str, tuple[nn.Module, str]], rows: list[dict[str, str]], spec: DistillSpec) -> list[dict[str, Any]]:
    """summary.csv: the teacher and each student's cost (attention FLOPs, forward ms, peak MiB on
    one held-out batch) and quality (zero-shot and final held-out KL, agreement, perplexity)."""
    from attnbench import data

    probe = data.eval_batches(source.streams["valid"], source.task, source.seq, source.batch, 1, source.tokenizer, spec.seed)[0]
    valid = [r for r in rows if r["split"] == "valid"]
    teacher_ppl = valid[-1]["ppl_teacher"] if valid else None
    summary = [{
        "model": "teacher", "mechanism": source.mechanism, "impl": "", "steps": "", "kl": 0.0, "agreement": 1.0,
        "ppl": teacher_ppl, "trainable_params": "", **measure_cost(source, source.model, source.mechanism, probe, spec.device),
    }]
    for mechanism, (student, impl) in students.items():
        mine = sorted((r for r in valid if r["student"] == mechanism), key=lambda r: int(r["step"]))
        summary.append({
            "model": "student", "mechanism": mechanism, "impl": impl, "steps": mine[-1]["step"],
            "kl_zero_shot": mine[0]["kl"] if mine[0]["step"] == "0" else None, "kl": mine[-1]["kl"],
            "agreement": mine[-1]["agreement"], "ppl": mine[-1]["ppl_student"],
            "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
            **measure_cost(source, student, mechanism, probe, spec.device),
        })
    (run_dir / SUMMARY_CSV).unlink(missing_ok=True)  # rewritten whole from distill.csv and fresh costs
    with store.RowLog(run_dir / SUMMARY_CSV, SUMMARY_COLUMNS) as out:
        for row in summary:
            out.append(row)
    return summary
