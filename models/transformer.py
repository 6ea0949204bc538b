"""Transformer language models whose attention is any registry mechanism.

    task "mlm"  BERT-style encoder: bidirectional, post-LN (pre-LN as an option), GELU,
               MLM head (dense + GELU + LayerNorm + decoder tied to the token embeddings)
    task "clm"  GPT-style decoder: causal, pre-LN with a final LayerNorm, tied LM head

Both are a `LanguageModel`: one `Trunk` (embeddings, blocks, optional final norm) plus a
head, and differ only through their `ModelConfig`. The attention of every block is
``registry.build_layer(mechanism, LayerConfig(...))``, called as layer(x [B, T, C], seq_lens).
Positions are a scheme of their own (models/positions.py): learned or sinusoidal embeddings are
added here, rope and alibi are applied by every attention layer, none adds nothing; without one
asked for, the mechanism's natural scheme (learned for standard, rope for rope, its own for exposb).

With the same weights, the MLM trunk computes transformers' BertModel hidden states and the
causal trunk GPT2Model's (tests/models/test_transformer.py copies weights across).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.models import positions as schemes, registry
from attnbench.models.presets import Preset
from attnbench.models.registry import LayerConfig

Task = Literal["mlm", "clm"]
IGNORE = -100  # label of a position that carries no loss (cross_entropy's ignore_index)


@dataclass
class ModelConfig:
    """Everything that shapes a model. Use `ModelConfig.for_task` for the BERT/GPT conventions.

    causal: GPT-style decoder (True) or BERT-style encoder; norm: "post" (BERT) or "pre" (GPT-2);
    positions: the position scheme, learned | sinusoidal | rope | alibi | none (models/positions.py),
        or "inside" for a mechanism that encodes positions itself (exposb, stickbreaking); None:
        the mechanism's natural scheme, which is what the config then records (`positions.resolve`);
    gelu: "none" (exact erf GELU, BERT) or "tanh" (GPT-2's approximation);
    max_seq: length of the learned position table (no limit for other schemes);
    attention: the mechanism's own options (registry Mechanism.params).
    """

    vocab_size: int
    dim: int
    layers: int
    heads: int
    mlp_dim: int
    max_seq: int
    mechanism: str = "standard"
    impl: str = "torch"
    causal: bool = False
    norm: Literal["post", "pre"] = "post"
    positions: str | None = None
    gelu: Literal["none", "tanh"] = "none"
    norm_eps: float = 1e-12
    kv_heads: int | None = None
    window: int | None = None
    dropout: float = 0.0
    attention: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mechanism = registry.get(self.mechanism)
        self.positions = schemes.resolve(mechanism, self.positions)
        reason = schemes.why_not(mechanism, self.positions)
        if reason:
            raise ValueError(reason)

    @classmethod
    def for_task(cls, task: Task, preset: Preset, vocab_size: int, mechanism: str, impl: str = "torch", seq: int | None = None, **overrides) -> "ModelConfig":
        """BERT conventions for "mlm" (post-LN, erf GELU, eps 1e-12), GPT-2's for "clm" (pre-LN, tanh GELU, eps 1e-5)."""
        if task not in ("mlm", "clm"):
            raise ValueError(f"unknown task '{task}'; valid: mlm, clm")
        conventions = (
            dict(causal=False, norm="post", gelu="none", norm_eps=1e-12)
            if task == "mlm"
            else dict(causal=True, norm="pre", gelu="tanh", norm_eps=1e-5)
        )
        shape = dict(dim=preset.dim, layers=preset.layers, heads=preset.heads, mlp_dim=preset.mlp_dim, max_seq=seq or preset.seq)
        return cls(vocab_size=vocab_size, mechanism=mechanism, impl=impl, **{**shape, **conventions, **overrides})

    @property
    def max_length(self) -> int | None:
        """The longest input the model can take: max_seq with learned positions, else no limit."""
        return self.max_seq if self.positions == "learned" else None

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            dim=self.dim, heads=self.heads, kv_heads=self.kv_heads, causal=self.causal, impl=self.impl,
            window=self.window, bias=True, positions=schemes.layer_scheme(self.positions), options=dict(self.attention),
        )


INIT_STD = 0.02  # BERT's and GPT-2's: every Linear and Embedding weight starts N(0, INIT_STD)


def sinusoidal_positions(length: int, dim: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """Vaswani et al.'s fixed embeddings [T, C] of positions start .. start+T-1: sin on even channels, cos on odd, wavelengths
    up to 10000 * 2pi, scaled to the token embeddings' init (root mean square INIT_STD; the raw
    table's is 1/sqrt(2)). Vaswani et al. scale the tokens up by sqrt(C) instead; added raw to
    N(0, 0.02) tokens the table outweighs them 35 to 1 and the model learns from positions alone."""
    position = torch.arange(start, start + length, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table * (INIT_STD * math.sqrt(2.0))


class Embeddings(nn.Module):
    """Token ids [B, T] -> [B, T, C]: token embedding, plus absolute positions when the scheme is
    learned or sinusoidal, then LayerNorm in post-LN models (BERT normalises its embeddings; pre-LN models
    normalise at the start of every block instead). ``start``: the position of the first token (0,
    but the number of tokens already cached in a generate step, models/generate.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positions = nn.Embedding(cfg.max_seq, cfg.dim) if cfg.positions == "learned" else None
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.norm == "post" else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.tokens(input_ids)  # (B, T, C)
        if self.positions is not None:
            if start + t > self.cfg.max_seq:
                raise ValueError(f"input of {start + t} tokens is longer than the {self.cfg.max_seq} learned positions")
            x = x + self.positions.weight[start : start + t]
        elif self.cfg.positions == "sinusoidal":
            x = x + sinusoidal_positions(t, self.cfg.dim, x.device, start).to(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class MLP(nn.Module):
    """[B, T, C] -> [B, T, C]: Linear(C, 4C), GELU, Linear(4C, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.down = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.gelu = cfg.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.gelu))


class Block(nn.Module):
    """One transformer block [B, T, C] -> [B, T, C].

    post-LN (BERT): x = LN(x + Attn(x)); x = LN(x + MLP(x))
    pre-LN (GPT-2): x = x + Attn(LN(x)); x = x + MLP(LN(x))
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attention = registry.build_layer(cfg.mechanism, cfg.layer_config())
        self.mlp = MLP(cfg)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        return self.around(lambda h: self.attention(h, seq_lens), x)

    def around(self, attention: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """This block on x [B, T, C] with ``attention`` (h [B, T, C] -> [B, T, C]) in its attention
        layer's place: the layer itself in forward, a layer's cache in a generate step (models/generate.py)."""
        if self.pre_norm:
            x = x + self.dropout(attention(self.norm1(x)))
            return x + self.dropout(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.dropout(attention(x)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class Trunk(nn.Module):
    """Token ids [B, T] (+ seq_lens [B], the valid length of each right-padded row) -> hidden [B, T, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.norm == "pre" else None

    def forward(self, input_ids: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for block in self.blocks:
            x = block(x, seq_lens)
        return x if self.final_norm is None else self.final_norm(x)


class MLMHead(nn.Module):
    """BERT's prediction head, hidden [N, C] -> logits [N, V]: dense + GELU + LayerNorm, then the
    token embedding matrix (tied) and a per-token bias."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.gelu = cfg.gelu

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden), approximate=self.gelu))
        return F.linear(h, self.embedding.weight, self.bias)


class LMHead(nn.Module):
    """GPT-2's head, hidden [N, C] -> logits [N, V]: the token embedding matrix (tied), no bias."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embedding.weight)


class LossParts(NamedTuple):
    """Summed cross-entropy over labelled positions, how many there were, how many were right."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    correct: torch.Tensor


class LanguageModel(nn.Module):
    """Trunk + head: input_ids [B, T] (+ seq_lens [B]) -> logits [B, T, V].

    ``seed`` fixes the init of every Linear and Embedding by its name, so models that differ
    only in their attention start from identical weights everywhere else.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        tokens = self.trunk.embeddings.tokens
        self.head = LMHead(tokens) if cfg.causal else MLMHead(cfg, tokens)
        init_weights(self, seed)

    def forward(self, input_ids: torch.Tensor, seq_lens: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """logits [B, T, V]; or, given labels [B, T], the LossParts of `lm_loss` (so a DDP
        wrapper's forward computes the loss and its gradient hooks see it)."""
        hidden = self.trunk(input_ids, seq_lens)  # (B, T, C)
        if labels is None:
            return self.head(hidden)
        keep = labels != IGNORE
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA graph (speed --level model-graph) takes no data-dependent shape: every
            # position goes through the head and unlabelled ones are ignored, the same loss
            logits, targets, keep = self.head(hidden).float().flatten(0, 1), labels.flatten(), keep.flatten()
            correct = ((logits.argmax(-1) == targets) & keep).sum()
        else:
            logits = self.head(hidden[keep]).float()  # (N, V): the head runs on labelled positions only
            targets = labels[keep]
            correct = (logits.argmax(-1) == targets).sum()
        loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        return LossParts(loss_sum, keep.sum(), correct)


def seq_lens_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """A BERT attention_mask [B, T] (1 = token, 0 = padding) -> seq_lens [B]. Only right padding
    has a length; any other pattern raises rather than being approximated."""
    mask = attention_mask.bool()
    seq_lens = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] < seq_lens[:, None]):
        raise ValueError("attention_mask must be right padding (ones, then zeros) in every row")
    return seq_lens


def init_weights(model: nn.Module, seed: int) -> None:
    """BERT's and GPT-2's init: N(0, 0.02) weights, zero biases (LayerNorm keeps ones/zeros),
    each weight drawn from a generator keyed by (seed, module name). Other parameters (a
    mechanism's own) keep the init their module gave them."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            key = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")
            weight = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(key)) * INIT_STD
            with torch.no_grad():
                module.weight.copy_(weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, seq_lens: torch.Tensor | None = None) -> LossParts:
    """Cross-entropy of ``model`` (a LanguageModel, or one wrapped in DDP) on input_ids [B, T]
    against labels [B, T] (IGNORE where no loss). The head runs only on labelled positions: for
    MLM that is 15% of them, and the [B, T, V] logits never exist."""
    return model(input_ids, seq_lens, labels)


def build_model(
    preset: Preset | str, mechanism: str, impl: str = "torch", task: Task = "mlm", seq: int | None = None,
    vocab_size: int | None = None, seed: int = 0, positions: str | None = None, **overrides,
) -> LanguageModel:
    """The model the training and the model-level speed sweep use: ``preset`` shape, ``mechanism``
    run by ``impl``, BERT (mlm) or GPT (clm) conventions, position scheme ``positions`` (None:
    the mechanism's natural one; learned positions cover ``seq`` tokens). ValueError with
    `positions.why_not`'s reason for a scheme the mechanism cannot take."""
    preset = Preset.from_name(preset) if isinstance(preset, str) else preset
    if positions is not None:
        reason = schemes.why_not(registry.get(mechanism), positions)
        if reason:
            raise ValueError(reason)
    cfg = ModelConfig.for_task(task, preset, vocab_size or preset.vocab, mechanism, impl, seq, positions=positions, **overrides)
    return LanguageModel(cfg, seed)


def training_step(model: LanguageModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimisation step on ``batch`` (input_ids, labels [B, T]; seq_lens [B] optional):
    forward, mean loss over labelled tokens, backward, optimizer step. Returns the loss (detached)."""
    parts = lm_loss(model, batch["input_ids"], batch["labels"], batch.get("seq_lens"))
    loss = parts.loss_sum / parts.count.clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def param_counts(model: LanguageModel) -> dict[str, int]:
    """Parameters per component (embeddings, attention, mlp, norms, head) and in total.

    Tied weights count once, under embeddings; so the GPT head counts 0.
    """
    seen: set[int] = set()

    def count(module: nn.Module | None) -> int:
        total = 0
        for p in ([] if module is None else module.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    blocks = model.trunk.blocks
    counts = {
        "embeddings": count(model.trunk.embeddings),
        "attention": sum(count(b.attention) for b in blocks),
        "mlp": sum(count(b.mlp) for b in blocks),
        "norms": sum(count(b.norm1) + count(b.norm2) for b in blocks) + count(model.trunk.final_norm),
        "head": count(model.head),
    }
    counts["total"] = sum(counts.values())
    return counts
