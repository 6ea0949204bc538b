"""How a distilled student is judged against its teacher: held-out KL, top-1 agreement and
both perplexities; attention FLOPs, forward time and peak memory; greedy and sampled
continuations of fixed prompts (generations.md/.json)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnbench import timing
from attnbench.train.data import IGNORE
from attnbench.train.evaluate import autocast

GENERATIONS = "generations"
PROMPTS = [
    "def read_config(path):\n",
    "import os\nimport sys\n\n",
    "The following example shows how to",
    "class Queue:\n    \"\"\"",
]


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P_teacher || P_student) [N] for logits [N, V], both softened by ``temperature``, in fp32.

    Clamped at 0 here, the one place every KL (training loss, held-out rows, summary, report) is
    computed: a KL is >= 0, but fp32 rounding of nearly equal distributions lands a few 1e-8 below."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


@torch.no_grad()
def evaluate(source, student: nn.Module, batches: list[dict[str, torch.Tensor]], device: str) -> dict[str, float]:
    """Held-out KL(teacher || student) per token at temperature 1, top-1 agreement, and the
    perplexity of both on the labelled tokens of ``batches``."""
    totals = dict(kl=0.0, agree=0.0, nll_student=0.0, nll_teacher=0.0, count=0)
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device):
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
    batch = to_device(batch, device)
    b, t = batch["input_ids"].shape

    @torch.no_grad()
    def forward():
        with autocast(device):
            source.logits(model, batch)

    forward()  # warm-up: autotuning and caches stay out of the numbers
    dev = torch.device(device)
    return {
        "attn_flops": source.attention_flops(mechanism, b, t),
        "forward_ms": timing.measure(forward, dev).median_ms,
        "peak_mem_mib": timing.peak_memory_mib(forward, dev),
    }


@torch.no_grad()
def generate(source, model: nn.Module, prompt: list[int], new_tokens: int, device: str, generator: torch.Generator | None) -> list[int]:
    """``new_tokens`` continuation ids of ``prompt``: greedy without ``generator``, else sampled
    from the softmax with it. No KV cache (every mechanism works); the context is cut to the
    model's longest input; stops after an eos."""
    ids = list(prompt)
    for _ in range(new_tokens):
        context = ids[-source.max_length :] if source.max_length else ids
        with autocast(device):
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


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
