"""Named model sizes and their training defaults (gpt-fast's ``ModelArgs.from_name`` habit).

    tiny   2 x 128, 4 heads: trains in seconds on a CPU (smoke tests, CI)
    small  8 x 512, 8 heads: about 30M parameters with an 8k vocabulary
    base   12 x 768, 12 heads: BERT-base / GPT-2 small shape (about 110M with a 30k vocabulary)

The vocabulary size comes from the tokenizer, not the preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnbench.models.registry import UnknownNameError


@dataclass(frozen=True)
class Preset:
    """A model shape plus the training defaults that suit it.

    dim: model width C; layers: blocks; heads: query heads (head_dim = dim // heads);
    mlp_dim: hidden width of the MLP (4 * dim, as in BERT and GPT-2);
    seq, batch, lr, warmup: what `attnbench train` uses unless told otherwise.
    """

    name: str
    dim: int
    layers: int
    heads: int
    seq: int
    batch: int
    lr: float
    warmup: int
    vocab: int  # BPE vocabulary size trained for this preset
    mlp_dim: int = 0  # 0: 4 * dim

    def __post_init__(self) -> None:
        if self.mlp_dim == 0:
            object.__setattr__(self, "mlp_dim", 4 * self.dim)

    @classmethod
    def from_name(cls, name: str) -> "Preset":
        try:
            return PRESETS[name]
        except KeyError:
            raise UnknownNameError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}") from None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", dim=128, layers=2, heads=4, seq=128, batch=8, lr=2e-3, warmup=20, vocab=2048),
        Preset("small", dim=512, layers=8, heads=8, seq=512, batch=32, lr=6e-4, warmup=500, vocab=8192),
        Preset("base", dim=768, layers=12, heads=12, seq=512, batch=32, lr=3e-4, warmup=1000, vocab=30522),
    )
}
