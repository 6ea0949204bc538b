"""Generation from a causal LanguageModel: the prompt prefilled once, then one token per step,
each attention layer keeping its own cache (registry DecodeForm.layer_cache): a KV cache for
the softmax family (standard, rope, alibi, window; models/softmax_decode.KVCache), stickbreaking,
exposb, topk and hopfield (their own steps over it), block (a rolling one of a block's keys), nsa
(every key plus its block means), learned (every key plus its current and previous query blocks'
summaries), a recurrent state for linear and deltanet (models/state_decode.py), performer, gau and
bsbr (in their files).

The context window. A model with learned positions takes at most ``cfg.max_length`` tokens;
recomputation then feeds it the last max_length of them, their positions counted from 0 again.
A cache holds keys embedded at their first positions, so it cannot be slid to that: the cached
path runs while the context fits and recomputes from the first token that would overflow it,
choosing exactly the tokens recomputation alone would. Other schemes have no limit; a sliding
window's KV cache rolls (W + 1 rows), the others grow to the prompt plus the new tokens.

Shapes: token ids [B, T]; logits [B, V] (the next token's, float32 or autocast's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from attnbench.models import registry
from attnbench.models.transformer import LanguageModel


@dataclass(frozen=True)
class Generation:
    """The new tokens (an eos included where generation stopped at it), how many were chosen from
    cached logits and how many by recomputing the context, and why any was recomputed (None: none)."""

    ids: list[int]
    cached: int
    recomputed: int
    reason: str | None


def why_no_cache(model: LanguageModel) -> str | None:
    """Why ``model`` cannot decode incrementally here (every token recomputes its context), or None."""
    cfg = model.cfg
    if not cfg.causal:
        return "a bidirectional model: every new token changes the earlier tokens' hidden states"
    decode = registry.get(cfg.mechanism).decode
    if decode is None or decode.layer_cache is None:
        return f"{cfg.mechanism} has no incremental form here (no KV cache or recurrent state)"
    try:
        decode.layer_cache(model.trunk.blocks[0].attention, 1)
    except ValueError as err:  # options the step cannot take (a window right of the query, a RoPE offset)
        return f"{cfg.mechanism}: {err}"
    return None


def cache_snapshot(cache) -> dict:
    """A layer cache's attributes: all restore_cache needs to undo its steps since. The caches replace
    their lengths and states by new tensors at each step, and the rows a step writes lie past the
    snapshot's lengths (or, in a rolling cache, hold a key no longer in the window). Not a state that
    a fused step writes in place (models/state_decode.FusedStateCache with fused_step, which only
    `speed`'s timing runs: a step's work does not depend on what the state holds)."""
    return dict(vars(cache))


def restore_cache(cache, snapshot: dict) -> None:
    vars(cache).update(snapshot)


class Decoder:
    """Incremental forward of a causal LanguageModel whose `why_no_cache` is None: prefill(ids
    [B, T]) once, then step(tokens [B]) per token; both return the next token's logits [B, V].
    ``capacity``: the most tokens the context will hold (at most the model's max_length);
    ``layer_cache``: the cache class to use instead of the mechanism's (DecodeForm.layer_cache's signature)."""

    def __init__(self, model: LanguageModel, capacity: int, layer_cache: Callable | None = None):
        reason = why_no_cache(model)
        if reason:
            raise ValueError(reason)
        limit = model.cfg.max_length
        if limit is not None and capacity > limit:
            raise ValueError(f"a context of {capacity} tokens is longer than the model's {limit} positions")
        cache = layer_cache or registry.get(model.cfg.mechanism).decode.layer_cache
        self.model, self.capacity, self.length = model, capacity, 0
        self.caches = [cache(block.attention, capacity) for block in model.trunk.blocks]

    def _forward(self, ids: torch.Tensor, stage: str) -> torch.Tensor:
        """ids [B, N] at positions length .. length+N-1 through every block -> logits [B, V] of the last."""
        trunk = self.model.trunk
        x = trunk.embeddings(ids, start=self.length)  # (B, N, C)
        for block, cache in zip(trunk.blocks, self.caches):
            x = block.around(getattr(cache, stage), x)
        x = x[:, -1] if trunk.final_norm is None else trunk.final_norm(x[:, -1])
        self.length += ids.shape[1]
        return self.model.head(x)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt ids [B, T] (T <= capacity) into every cache -> logits [B, V] after it."""
        if self.length:
            raise ValueError("prefill runs once, on an empty cache")
        if ids.shape[1] > self.capacity:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens exceeds the capacity of {self.capacity}")
        return self._forward(ids, "prefill")

    def fill(self, batch: int, context: int) -> None:
        """Every cache as if B sequences of ``context`` tokens had been prefilled, with random contents
        (``speed --level model --mode decode``: a step's cost without a prefill of that length)."""
        if context >= self.capacity:
            raise ValueError(f"a context of {context} tokens leaves no room for a step (capacity {self.capacity})")
        weight = next(self.model.parameters())
        kind = weight.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype  # what the projections give
        for cache in self.caches:
            cache.fill(batch, context, weight.device, dtype)
        self.length = context

    def snapshot(self) -> tuple:
        """What restore() needs to undo the steps taken after it (cache_snapshot of each layer's)."""
        return self.length, [cache_snapshot(cache) for cache in self.caches]

    def restore(self, snapshot: tuple) -> None:
        self.length, kept = snapshot
        for cache, attributes in zip(self.caches, kept):
            restore_cache(cache, attributes)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence, tokens [B], appended -> logits [B, V] after it."""
        if not self.length:
            raise ValueError("step after prefill")
        if self.length >= self.capacity:
            raise ValueError(f"the context is full ({self.capacity} tokens)")
        return self._forward(tokens[:, None], "step")


def choose(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """The next token of logits [V]: the argmax without ``generator``, else sampled from their softmax with it (on CPU)."""
    logits = logits.float()
    if generator is None:
        return int(logits.argmax())
    return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))


def recompute(
    sequence_logits: Callable[[torch.Tensor], torch.Tensor], max_length: int | None, prompt: list[int], new_tokens: int,
    device: torch.device | str, *, generator: torch.Generator | None = None, eos_id: int | None = None, reason: str | None = None,
) -> Generation:
    """Generation with no cache, any causal LM: every token's logits from ``sequence_logits`` (ids [1, T]
    -> logits [T, V]) over the context cut to its last ``max_length`` tokens (None: no limit). ``reason``:
    why this path runs, recorded in the result."""
    ids = list(prompt)
    for _ in range(new_tokens):
        context = ids[-max_length:] if max_length else ids
        token = choose(sequence_logits(torch.tensor([context], device=device))[-1], generator)
        ids.append(token)
        if token == eos_id:
            break
    new = ids[len(prompt) :]
    return Generation(new, cached=0, recomputed=len(new), reason=reason or "recomputed by request")


def generate(
    model: LanguageModel, prompt: list[int], new_tokens: int, *, generator: torch.Generator | None = None,
    eos_id: int | None = None, cache: bool = True,
) -> Generation:
    """``new_tokens`` continuation ids of ``prompt`` (greedy without ``generator``, else sampled with it;
    stops after ``eos_id``), from the layers' caches where the model has them (``cache=False``: never),
    else by recomputation; the same tokens either way (module docstring). Call under torch.no_grad()
    and with the model in eval mode (dropout would differ between the paths)."""
    if not prompt:
        raise ValueError("an empty prompt has no last token to continue")
    device = next(model.parameters()).device
    limit = model.cfg.max_length
    reason = why_no_cache(model) if cache else "cache=False"

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(ids)[0]

    if reason or new_tokens <= 0:
        return recompute(forward, limit, prompt, new_tokens, device, generator=generator, eos_id=eos_id, reason=reason)
    context = prompt[-limit:] if limit else prompt
    decoder = Decoder(model, min(len(context) + new_tokens - 1, limit or len(context) + new_tokens))
    logits = decoder.prefill(torch.tensor([context], device=device))
    new: list[int] = []
    while True:
        new.append(choose(logits[0], generator))
        if new[-1] == eos_id or len(new) == new_tokens:
            return Generation(new, cached=len(new), recomputed=0, reason=None)
        if decoder.length == decoder.capacity:  # the next context overflows the learned positions
            rest = recompute(forward, limit, prompt + new, new_tokens - len(new), device, generator=generator, eos_id=eos_id)
            why = f"the context passed the model's {limit} positions: recomputed over its last {limit} tokens, re-embedded from 0"
            return Generation(new + rest.ids, cached=len(new), recomputed=len(rest.ids), reason=why)
        logits = decoder.step(torch.tensor(new[-1:], device=device))
