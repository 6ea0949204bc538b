"""Scalability: one attention layer of the teacher and of each distilled student, timed at
lengths longer than the run trains on (scale.csv, SCALE_COLUMNS), in the same process.

Each model's first block's attention layer, its trained weights copied into a fresh layer on
the impl named in the row, runs forward in eval mode without autograd on x [B, T, C] (B =
TOKENS // T, at least 1, so that short lengths are not timed as launch overhead alone): held-out
text as that layer sees it (INPUT: the model's own embeddings, and its first block's norm when
it normalises before attention, of held-out rows of at most the model's longest input,
concatenated to T tokens; the split repeats when it has fewer), since a learned mask decides
its blocks from its input (on N(0, 1) noise, what runs before the ``input`` column timed, the
trained scorers keep every block). Under the run's autocast (bf16 on CUDA): median
ms (bench/timing.py) and peak MiB beyond the input (CUDA only). The teacher is also timed on our
dense flash kernel and on cuDNN where they run, so a student's time has both peers beside it. A
learned mask decides its blocks from that input: the row records the density it kept. An OOM is
a row (status oom); a teacher from transformers has no layer of ours to time (unsupported).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

import torch
from torch import nn

from attnbench import timing
from attnbench.models import registry
from attnbench.train.evaluate import autocast

TEACHER_PEERS = ("triton", "sdpa-cudnn")  # the dense kernel and cuDNN, beside the teacher's own impl
DEFAULT_SEQ = {"cuda": [1024, 4096, 16384], "cpu": [256, 1024]}
TOKENS = {"cuda": 65536, "cpu": 1024}  # tokens per timed call: B = TOKENS // T
INPUT = "held-out text"  # what scale.csv's input column records


def default_seq(device: str) -> list[int]:
    """The lengths timed when --scale-seq is not given: the issue's 1k, 4k, 16k on CUDA, short on CPU."""
    return DEFAULT_SEQ["cuda" if device.startswith("cuda") else "cpu"]


def first_layer(model: nn.Module, mechanism: str, impl: str) -> nn.Module:
    """A fresh ``mechanism`` layer on ``impl`` holding ``model``'s first attention layer's weights."""
    cfg = replace(model.cfg.layer_config(), impl=impl)
    layer = registry.build_layer(mechanism, cfg).to(next(model.parameters()).device)
    layer.load_state_dict(model.trunk.blocks[0].attention.state_dict())
    return layer.eval()


def timed_layers(source, models: dict[str, tuple[str, str, nn.Module]], device: str) -> Iterator[tuple[str, str, str]]:
    """(model name, mechanism, impl) of each row: the teacher on its impl and TEACHER_PEERS that
    run here, then every model of ``models`` (name -> (mechanism, impl, model)) on its own."""
    teacher, own, model = models["teacher"]
    yield "teacher", teacher, own
    entry = registry.get(teacher)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for impl in TEACHER_PEERS:
        if impl != own and impl in entry.impls and hasattr(model, "cfg") and \
                entry.impl(impl).why_not(model.cfg.layer_config(), device, dtype) is None:
            yield "teacher", teacher, impl
    for name, (mechanism, impl, _) in models.items():
        if name != "teacher":
            yield name, mechanism, impl


def scale_rows(source, models: dict[str, tuple[str, str, nn.Module]], seqs: list[int], device: str) -> Iterator[dict[str, Any]]:
    """scale.csv's rows, one per (timed layer, length), as they are measured."""
    dev = torch.device(device)
    tokens = TOKENS["cuda" if dev.type == "cuda" else "cpu"]
    for name, mechanism, impl in timed_layers(source, models, device):
        base = {"model": name, "mechanism": mechanism, "impl": impl}
        model = models.get(name, models["teacher"])[2]
        if not hasattr(model, "trunk"):
            for seq in seqs:
                yield {**base, "seq": seq, "batch": max(1, tokens // seq), "status": "unsupported",
                       "message": "a transformers model has no layer of ours to time"}
            continue
        layer = first_layer(model, mechanism, impl)
        for seq in seqs:
            batch = max(1, tokens // seq)
            x = layer_input(model, source.streams["valid"], batch, seq, dev)
            yield {**base, "seq": seq, "batch": batch, "input": INPUT, **measure(layer, x, dev)}


@torch.no_grad()
def layer_input(model: nn.Module, stream: torch.Tensor, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Held-out tokens ``stream`` [N] as ``model``'s first attention layer sees them (module
    docstring): x [batch, seq, C] float32."""
    piece = min(seq, model.cfg.max_length or seq)
    rows = -(-batch * seq // piece)
    ids = stream.repeat(-(-rows * piece // stream.numel()))[: rows * piece].view(rows, piece).to(device)
    x = model.trunk.embeddings(ids)
    block = model.trunk.blocks[0]
    if block.pre_norm:
        x = block.norm1(x)
    return x.float().reshape(-1, x.shape[-1])[: batch * seq].view(batch, seq, -1)


@torch.no_grad()
def measure(layer: nn.Module, x: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """forward_ms, peak_mem_mib and (learned masks) density of ``layer`` on x [B, T, C]; an OOM: status oom."""
    try:

        def forward():
            with autocast(device.type):
                layer(x)

        forward()  # compilation, autotuning and caches stay out of the numbers
        row = {"forward_ms": timing.measure(forward, device).median_ms, "peak_mem_mib": timing.peak_memory_mib(forward, device)}
        if callable(getattr(layer, "density", None)):
            row["density"] = float(layer.density().mean())
        return {**row, "status": "ok"}
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"status": "oom", "message": str(err).split("\n")[0]}
