"""Continuations of prompts by the teacher and each student, and how they read: generations.md/.json.

Prompts: a file (--prompts) whose prompts are separated by lines holding only ``---`` (each
prompt's text as written, its newlines kept but the one before the separator), or PROMPTS.

Metrics of one continuation (its token ids c_1 .. c_n; rows of generations.json, and their mean
per model in summary.csv):
    distinct_1, distinct_2   unique n-grams / n-grams of c (lexical diversity; Li et al. 2016)
    rep_4                    1 - unique 4-grams / 4-grams of c (seq-rep-4; Welleck et al. 2019)
    fluency_ppl              exp(-mean_i log P_teacher(c_i | prompt, c_<i)): the frozen teacher's
                             perplexity of the continuation, a fluency proxy (the teacher's own: ~its ppl)
A metric with no n-gram to count (a continuation shorter than n) is empty.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnbench import store
from attnbench.distill.columns import GENERATION_METRICS
from attnbench.errors import InputError
from attnbench.models import generate as decoding
from attnbench.models.transformer import LanguageModel
from attnbench.train.evaluate import autocast

GENERATIONS = "generations"
PROMPT_SEPARATOR = "---"
PROMPTS = [
    "def read_config(path):\n",
    "import os\nimport sys\n\n",
    "The following example shows how to",
    "class Queue:\n    \"\"\"",
]


def read_prompts(path: str | None) -> list[str]:
    """The prompts of the file ``path`` (module docstring), or PROMPTS for None."""
    if path is None:
        return PROMPTS
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--prompts {path}: {err.strerror if isinstance(err, OSError) else 'not UTF-8 text'}") from None
    prompts, current = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == PROMPT_SEPARATOR:
            prompts.append("".join(current).removesuffix("\n"))
            current = []
        else:
            current.append(line)
    prompts.append("".join(current).removesuffix("\n"))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise InputError(f"--prompts {path} holds no prompt (prompts are separated by lines holding only {PROMPT_SEPARATOR})")
    return prompts


@torch.no_grad()
def generate(source, model: nn.Module, prompt: list[int], new_tokens: int, device: str, generator: torch.Generator | None) -> list[int]:
    """``new_tokens`` continuation ids of ``prompt``: greedy without ``generator``, else sampled
    from the softmax with it; stops after an eos. An attnbench LanguageModel decodes with its
    layers' KV cache or state where its mechanism has one (models/generate.py: the same tokens
    as recomputing); any other model, and mechanisms without one, recompute the context, cut
    to the model's longest input, for every token."""
    eos = source.tokenizer.eos_id
    with autocast(device):
        if isinstance(model, LanguageModel):
            return decoding.generate(model, prompt, new_tokens, generator=generator, eos_id=eos).ids
        forward = lambda ids: source.sequence_logits(model, ids)  # noqa: E731
        return decoding.recompute(forward, source.max_length, prompt, new_tokens, device, generator=generator, eos_id=eos,
                                  reason="not an attnbench LanguageModel").ids


def distinct(ids: list[int], n: int) -> float | None:
    """Unique n-grams / n-grams of ``ids`` (None without any)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


@torch.no_grad()
def fluency_ppl(source, prompt: list[int], continuation: list[int], device: str) -> float | None:
    """The teacher's perplexity of ``continuation`` after ``prompt`` (None for an empty one)."""
    if not continuation:
        return None
    ids = (prompt + continuation)[-(source.max_length + 1) :] if source.max_length else prompt + continuation
    with autocast(device):
        logits = source.sequence_logits(source.model, torch.tensor([ids[:-1]], device=device)).float()
    n = min(len(continuation), len(ids) - 1)  # a context cut to max_length scores its last n tokens
    return math.exp(F.cross_entropy(logits[-n:], torch.tensor(ids[-n:], device=logits.device)).item())


def metrics(source, prompt: list[int], continuation: list[int], device: str) -> dict[str, float | None]:
    """The metrics of one continuation (module docstring)."""
    four = distinct(continuation, 4)
    return {
        "distinct_1": distinct(continuation, 1), "distinct_2": distinct(continuation, 2),
        "rep_4": None if four is None else 1.0 - four, "fluency_ppl": fluency_ppl(source, prompt, continuation, device),
    }


def decode(tokenizer, ids: list[int]) -> str:
    """Token ids -> text (data.Tokenizer has no decode: bytes decode as UTF-8, BPE through its backend)."""
    if tokenizer.backend is None:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    return tokenizer.backend.decode(ids)


def generations(source, models: dict[str, nn.Module], prompts: list[str], new_tokens: int, seed: int, device: str) -> list[dict[str, Any]]:
    """Each prompt continued by each model, greedy and sampled, with its metrics; a sampled prompt
    uses the same seed for every model, so the texts differ only by the model."""
    rows = []
    for index, (text, prompt) in enumerate(zip(prompts, source.tokenizer.encode_batch(prompts))):
        for name, model in models.items():
            for mode in ("greedy", "sampled"):
                generator = None if mode == "greedy" else torch.Generator().manual_seed(seed + index)
                ids = generate(source, model, prompt, new_tokens, device, generator)
                rows.append({"prompt": text, "model": name, "mode": mode, "seed": seed + index if generator else None,
                             "text": decode(source.tokenizer, ids), **metrics(source, prompt, ids, device)})
    return rows


def mean_metrics(rows: list[dict[str, Any]], model: str) -> dict[str, float | None]:
    """Each metric's mean over ``model``'s generations (greedy and sampled), None where none has it."""
    out = {}
    for key in GENERATION_METRICS:
        values = [row[key] for row in rows if row["model"] == model and row[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def write_generations(run_dir: Path, rows: list[dict[str, Any]], note: str | None = None) -> None:
    """generations.json (the rows) and generations.md (per prompt, each model's continuations and metrics)."""
    store.write_json(run_dir / f"{GENERATIONS}.json", rows)
    lines = ["# Generations", ""]
    if note:
        lines += [note, ""]
    for prompt in dict.fromkeys(row["prompt"] for row in rows):
        lines += [f"## Prompt: `{prompt!r}`", ""]
        for row in (r for r in rows if r["prompt"] == prompt):
            seed = f", seed {row['seed']}" if row["seed"] is not None else ""
            scores = ", ".join(f"{key} {row[key]:.3g}" for key in GENERATION_METRICS if row[key] is not None)
            lines += [f"**{row['model']}** ({row['mode']}{seed}; {scores})", "", "```", prompt + row["text"], "```", ""]
    with store.replacing(run_dir / f"{GENERATIONS}.md") as tmp:
        tmp.write_text("\n".join(lines))
