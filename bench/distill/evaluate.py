"""How a distilled student is judged against its teacher: held-out KL, top-1 agreement and
both perplexities (also on the edge cases of bench/distill/edges.py); attention FLOPs, forward
time and peak memory of the whole model. Its generations: bench/distill/generate.py."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnbench import timing
from attnbench.train.data import IGNORE
from attnbench.train.evaluate import autocast


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
    """Attention FLOPs (the registry's forward model, all layers; a learned mask's layers count the
    blocks they kept on this batch, ``visited_flops()``) and the whole model's forward time
    (median ms) and peak memory (MiB, CUDA only) on one evaluation batch."""
    batch = to_device(batch, device)
    b, t = batch["input_ids"].shape

    @torch.no_grad()
    def forward():
        with autocast(device):
            source.logits(model, batch)

    forward()  # warm-up: autotuning and caches stay out of the numbers
    masked = [m for m in model.modules() if callable(getattr(m, "visited_flops", None))]
    flops = sum(m.visited_flops() for m in masked) if masked else source.attention_flops(mechanism, b, t)
    dev = torch.device(device)
    return {
        "attn_flops": flops,
        "forward_ms": timing.measure(forward, dev).median_ms,
        "peak_mem_mib": timing.peak_memory_mib(forward, dev),
    }


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
