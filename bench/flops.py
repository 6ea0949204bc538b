"""Every FLOP count the harness records, FlashAttention-3 convention: one measured case
(speed.csv's flops; a packed batch's flops_padded beside them), a training step per token
(MFU, meta.json), a model's attention cores (distill's summary.csv), and CONVENTION, the
report's sentence saying how they are counted; and a decode step's bytes (speed.csv's bytes,
gbps, mem_per_seq_mib; BYTES_CONVENTION).

Forward FLOPs of an attention core come from its registry entry (Mechanism.flops; the shared
forms in models/pair_flops.py: 4 * Hq * D per visible q-k pair for softmax, counted exactly for
causal, window, padding and GQA). This module adds the mode multipliers and the projections.
A decode step's bytes come from the mechanism's decode form (Mechanism.decode, whose formulas
live in kernels/decode_cost.py, where the standalone kernels/bench_decode.py counts with them too).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from attnbench.models import registry
from attnbench.models.registry import MATMUL_BACKWARD, SOFTMAX_BACKWARD, LayerConfig, Mechanism
from attnbench.models.transformer import LanguageModel

LINEAR_MODE_FACTOR = {
    "fwd": 1.0,
    "bwd": MATMUL_BACKWARD,  # dX = dY W and dW = dY^T X, one matmul each the size of the forward one
    "fwdbwd": 1.0 + MATMUL_BACKWARD,
}


def core_mode_factor(mechanism: Mechanism, mode: str) -> float:
    """The multiple of the core's forward FLOPs that ``mode`` costs: 1 (fwd), the mechanism's
    backward_factor (bwd: 2.5 for forms that recompute their scores, 2.0 for matmul-only
    forms; models/registry.py), or 1 + that (fwdbwd)."""
    return {"fwd": 1.0, "bwd": mechanism.backward_factor, "fwdbwd": 1.0 + mechanism.backward_factor}[mode]


def _by_backward_factor() -> dict[float, list[str]]:
    groups: dict[float, list[str]] = {}
    for name, mechanism in registry.mechanisms().items():
        groups.setdefault(mechanism.backward_factor, []).append(name)
    return groups


def _convention() -> str:
    groups = _by_backward_factor()
    others = "; ".join(f"{factor:g}x for {', '.join(names)}" for factor, names in sorted(groups.items()) if factor != SOFTMAX_BACKWARD)
    return (
        "FLOPs follow the FlashAttention-3 convention: a softmax forward counts 4 * B * Hq * D per visible "
        "query-key pair (2 for QK^T, 2 for PV), with pairs counted exactly for causal masks, windows and "
        "padding; mechanisms with their own cost model (linear, performer, ...) use it. Backward = "
        f"{SOFTMAX_BACKWARD:g}x forward for forms that recompute their scores (2x for the gradient matmuls + 0.5x "
        f"recomputing QK^T: {', '.join(groups.get(SOFTMAX_BACKWARD, []))}); {others} (the gradients of their matmuls "
        f"alone); fwd+bwd = 1x + backward. At layer level every nn.Linear adds 2 FLOPs per multiply-add "
        f"(backward {LINEAR_MODE_FACTOR['bwd']:g}x)."
    )


CONVENTION = _convention()

BYTES_CONVENTION = (
    "A decode step's bytes are what it must move, each once: against a KV cache, K and V of every cached key "
    "its new queries see (the new tokens' own included; a window: W + N keys) plus q read and o written; "
    "with a recurrent state, the float32 state read and written plus the token's q, k, v (DeltaNet: beta) "
    "read and o written; nsa, each branch's keys (the selected and sliding ones apart) and the complete blocks' "
    "means; bsbr, its chunk state (kernels/decode_cost.py). "
    "GB/s = bytes / median time; % of bandwidth: of the measured copy GB/s (read + write)."
)


def decode_bytes(mechanism: Mechanism, cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    """Bytes one decode step of B sequences of ``context`` tokens (``queries`` new) must move (BYTES_CONVENTION)."""
    return int(mechanism.decode.bytes(cfg, batch, context, queries, itemsize))


def decode_memory_mib(mechanism: Mechanism, cfg: LayerConfig, context: int, queries: int, itemsize: int) -> float:
    """The KV cache or state one sequence holds at ``context`` tokens, MiB."""
    return mechanism.decode.memory(cfg, context, queries, itemsize) / 2**20


def gb_per_s(nbytes: float, median_ms: float) -> float:
    return nbytes / (median_ms * 1e-3) / 1e9


def core_flops(mechanism: Mechanism, cfg: LayerConfig, batch: int, seq: int, mode: str, seq_lens=None) -> float:
    """FLOPs of the kernel-level core in ``mode`` for q, k, v of ``seq`` tokens (key padding: seq_lens [B])."""
    return core_mode_factor(mechanism, mode) * mechanism.flops(cfg, batch, seq, seq_lens=seq_lens)


def varlen_flops(mechanism: Mechanism, cfg: LayerConfig, lengths: list[int], mode: str, per_token: float = 0.0) -> tuple[float, float]:
    """FLOPs in ``mode`` of a packed variable-length batch of sequences of ``lengths``, each attending
    to itself alone (``speed --lengths``), and what padding them to the longest would have cost:
    (packed, padded). Packed: the core summed over the sequences; padded: the core of N sequences of
    the longest length, every pair of the padding computed (what a dense kernel on the padded batch
    does), the same when every length is equal. ``per_token``: FLOPs of the layer's projections a
    token (layer level), counted on the pack's tokens and on the padded batch's."""
    packed = sum(core_flops(mechanism, cfg, 1, length, mode) for length in lengths)
    padded = core_flops(mechanism, cfg, len(lengths), max(lengths), mode)
    return packed + per_token * sum(lengths), padded + per_token * len(lengths) * max(lengths)


def linear_flops(layer: nn.Module, forward: Callable[[], object], mode: str) -> float:
    """FLOPs of every nn.Linear in ``layer`` during one call of ``forward`` (run here, without
    autograd), in ``mode``: 2 per multiply-add, counted on the inputs each Linear really sees."""
    macs = 0

    def count(module: nn.Linear, inputs, output) -> None:
        nonlocal macs
        rows = inputs[0].numel() // module.in_features
        macs += rows * module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in layer.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return LINEAR_MODE_FACTOR[mode] * 2.0 * macs


def tflops_per_s(flops: float, median_ms: float) -> float:
    return flops / (median_ms * 1e-3) / 1e12


def train_flops_per_token(model: LanguageModel, seq: int, mode: str = "fwdbwd") -> float:
    """Training FLOPs per token (``mode`` fwdbwd; fwd: the forward alone), for MFU: 2 per
    multiply-add of every matmul weight (every Linear and the tied output projection; embedding
    lookups are free) times the linear mode factor, plus the attention core's forward FLOPs at
    ``seq`` times the mechanism's core mode factor."""
    cfg = model.cfg
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    matmul_weights = linear_weights + cfg.vocab_size * cfg.dim  # the tied output projection
    per_token = 2 * LINEAR_MODE_FACTOR[mode] * matmul_weights  # 2 FLOPs per multiply-add
    core = core_flops(registry.get(cfg.mechanism), cfg.layer_config(), 1, seq, mode) / seq
    return per_token + cfg.layers * core


def attention_flops(mechanism: Mechanism, cfg: LayerConfig, layers: int, batch: int, seq: int) -> float:
    """Forward FLOPs of the attention cores of a ``layers``-layer model on [batch, seq] tokens."""
    return layers * core_flops(mechanism, cfg, batch, seq, "fwd")
