"""What a trained language model is measured on: held-out loss, perplexity and accuracy;
attention entropy per layer (read off the mechanism's torch impl); perplexity past the
trained length (length extrapolation)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from attnbench.models import registry
from attnbench.models.transformer import IGNORE, LanguageModel, lm_loss
from attnbench.train import data
from attnbench.train.spec import TrainSpec

EXTRAPOLATION_FACTORS = (1, 2, 4)


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (fp32 master weights); full fp32 on CPU. `train` and `distill` both run under it."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout, no performer feature redraws), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate(model: LanguageModel, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Loss (mean over labelled tokens), perplexity and token accuracy on fixed held-out batches."""
    loss_sum = count = correct = 0.0
    with evaluating(model), torch.no_grad(), autocast(device):
        for batch in batches:
            parts = lm_loss(model, batch["input_ids"].to(device), batch["labels"].to(device))
            loss_sum += parts.loss_sum.item()
            count += parts.count.item()
            correct += parts.correct.item()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "accuracy": correct / max(count, 1), "tokens": count}


def attention_probabilities(layer: torch.nn.Module, mechanism: str, q, k, seq_lens, **token_options) -> torch.Tensor:
    """The attention weights [B, Hq, T, S] of a q/k/v core, read off its torch impl by attending
    to one-hot values (any core is linear in v): values of width D, the core's own, whose column
    j is 1 at key c * D + j give o[b, t, h, j] = A[b, h, t, c * D + j], for c = 0, 1, ... until S.
    ``token_options``: per-token inputs a token-conditioned layer computed from x (nsa's gates)."""
    run = registry.get(mechanism).impls["torch"].run
    b, s, hkv, d = k.shape
    columns = []
    for first in range(0, s, d):
        onehot = torch.zeros(s, d, device=k.device, dtype=torch.float32)
        width = min(d, s - first)
        onehot[first : first + width, :width] = torch.eye(width, device=k.device)
        v = onehot[None, :, None, :].expand(b, s, hkv, d)
        out = run(q.float(), k.float(), v, causal=layer.causal, seq_lens=seq_lens, **layer.core_options(), **token_options)
        columns.append(out[..., :width])
    return torch.cat(columns, dim=-1).permute(0, 2, 1, 3)  # (B, Hq, T, S)


def attention_entropy(model: LanguageModel, input_ids: torch.Tensor) -> list[tuple[float | None, str]]:
    """(mean entropy in nats, message) per layer on input_ids [B, T]; None with the reason where
    the mechanism's weights are not defined as a probability distribution over keys."""
    mechanism = model.cfg.mechanism
    if "torch" not in registry.get(mechanism).impls:
        return [(None, f"{mechanism} has no torch impl to read weights from")] * model.cfg.layers
    captured: list[tuple] = []
    for block in model.trunk.blocks:
        layer = block.attention
        if not hasattr(layer, "attend"):
            return [(None, f"{mechanism} has no q/k/v core")] * model.cfg.layers

        def capture(q, k, v, seq_lens=None, _layer=layer, _attend=layer.attend, **token_options):
            captured.append((_layer, q.detach(), k.detach(), seq_lens, token_options))
            return _attend(q, k, v, seq_lens, **token_options)

        layer.attend = capture
    try:
        with evaluating(model), torch.no_grad():
            model.trunk(input_ids)
        results = []
        for layer, q, k, seq_lens, token_options in captured:
            try:
                with torch.no_grad():
                    probs = attention_probabilities(layer, mechanism, q, k, seq_lens, **token_options)
            except (RuntimeError, ValueError) as err:  # e.g. a core whose value width must equal D (bsbr)
                results.append((None, f"weights cannot be read off the torch impl: {str(err).splitlines()[0][:120]}"))
                continue
            totals = probs.sum(-1, keepdim=True)  # (B, Hq, T, 1)
            if probs.min() < -1e-4 or totals.min() <= 0:
                results.append((None, "weights are not a distribution over keys (negative or summing to 0)"))
                continue
            note = ""
            if (totals - 1).abs().max() > 1e-3:  # gated branches (nsa): the mixture each query reads, normalised
                probs = probs.clamp_min(0) / totals
                note = f"weights normalised per query (they sum to {totals.min().item():.3g}..{totals.max().item():.3g})"
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (B, Hq, T)
            results.append((entropy.mean().item(), note))
        return results
    finally:
        for block in model.trunk.blocks:
            del block.attention.attend  # the instance attribute goes; the class method is back


INFERENCE_FACTORS = (1, 4)  # inference tokens/s at the trained length L and at 4L


def inference_rows(model: LanguageModel, spec: TrainSpec, device: torch.device) -> Iterator[dict[str, Any]]:
    """The trained model's forward (eval mode, no autograd, the training autocast) on random
    tokens, at L and 4L with the same tokens per call (batch spec.batch, then batch / 4, at
    least 1): median ms and tokens/s (attnbench.timing). Past learned positions: unsupported."""
    from attnbench import timing

    for factor in INFERENCE_FACTORS:
        seq, batch = spec.seq * factor, max(1, spec.batch // factor)
        row = {"attn": model.cfg.mechanism, "positions": model.cfg.positions, "seq": seq, "batch": batch}
        limit = model.cfg.max_length
        if limit is not None and seq > limit:
            yield {**row, "status": "unsupported", "message": f"learned positions end at {limit}"}
            continue
        ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), device=device)

        def forward() -> None:
            with torch.no_grad(), autocast(device):
                model.trunk(ids)

        try:
            with evaluating(model):
                measured = timing.measure(forward, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            yield {**row, "status": "oom", "message": f"out of memory at {batch} x {seq} tokens"}
            continue
        yield {**row, "ms": measured.median_ms, "tokens_per_s": batch * seq / (measured.median_ms * 1e-3), "status": "ok", "message": ""}


def _sliding_windows(stream: torch.Tensor, seq: int, stride: int) -> dict[str, torch.Tensor]:
    """Windows of seq tokens every ``stride`` tokens; each scores only tokens no earlier window
    scored (the first window scores all), so every token is predicted once with >= seq - stride context."""
    starts = range(0, stream.numel() - seq - 1, stride)
    rows = torch.stack([stream[s : s + seq + 1] for s in starts])  # (W, seq + 1)
    labels = rows[:, 1:].clone()
    labels[1:, : seq - stride] = IGNORE
    return {"input_ids": rows[:, :-1], "labels": labels}


def extrapolation_rows(model: LanguageModel, spec: TrainSpec, stream: torch.Tensor, device: torch.device,
                       tokenizer: data.Tokenizer | None = None) -> Iterator[dict[str, Any]]:
    """Perplexity on the test split at L, 2L, 4L (L = the trained length) over the same token
    budget: clm on non-overlapping blocks and sliding windows (stride L/2 of the window); mlm
    (``tokenizer`` given, for its mask) on blocks with fixed masks, sliding windows unsupported."""
    budget = spec.eval_batches * spec.batch * spec.seq  # tokens scored at every length
    for factor in EXTRAPOLATION_FACTORS:
        seq = spec.seq * factor
        base = {"attn": model.cfg.mechanism, "positions": model.cfg.positions, "train_seq": spec.seq, "seq": seq, "factor": factor}
        for method in ("blocks", "sliding"):
            row = {**base, "method": method}
            limit = model.cfg.max_length
            if limit is not None and seq > limit:
                yield {**row, "status": "unsupported", "message": f"learned positions end at {limit}"}
                continue
            if spec.task == "mlm" and method == "sliding":
                yield {**row, "status": "unsupported", "message": "an encoder sees the whole window: MLM is scored on blocks"}
                continue
            span = stream[: budget + seq + 1]
            if span.numel() < seq + 2:
                yield {**row, "status": "skipped", "message": f"the test split has fewer than {seq + 2} tokens"}
                continue
            if spec.task == "mlm":
                batch = data.mask_tokens(data.blocks(span, seq), tokenizer, torch.Generator().manual_seed(spec.seed))
            elif method == "blocks":
                batch = data.causal_pair(data.blocks(span, seq + 1))
            else:
                batch = _sliding_windows(span, seq, max(1, seq // 2))
            per_batch = max(1, spec.batch // factor)
            chunks = [{k: v[i : i + per_batch] for k, v in batch.items()} for i in range(0, len(batch["input_ids"]), per_batch)]
            try:
                metrics = evaluate(model, chunks, device)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                yield {**row, "status": "oom", "message": f"out of memory at {seq} tokens"}
                continue
            yield {**row, "loss": metrics["loss"], "ppl": metrics["ppl"], "tokens": int(metrics["tokens"]), "status": "ok", "message": ""}
