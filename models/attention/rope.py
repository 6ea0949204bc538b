"""rope: softmax attention with rotary position embeddings (Su et al. 2021), rotate-half
convention; our impl rotates q and k in one Triton pass before its kernels, and its backward
kernels rotate dq and dk back in their epilogues (kernels/flash_rope.py); the peers rotate in torch."""

from attnbench.models.pair_flops import softmax_flops
from attnbench.models.registry import LayerConfig, Mechanism
from attnbench.models.qkv import qkv_layer
from attnbench.models.softmax import softmax_impls, window_option

DEFAULT_THETA = 10000.0


def rope_options(cfg: LayerConfig) -> dict:
    return {"theta": float(cfg.options.get("theta", DEFAULT_THETA)), "offset": 0, **window_option(cfg)}


MECHANISM = Mechanism(
    name="rope",
    description="softmax attention with rotary position embeddings (rotate-half)",
    family="exact",
    layer=qkv_layer(rope_options, softmax_impls()),
    impls=softmax_impls(),
    flops=softmax_flops,
    params={"theta": (DEFAULT_THETA, "RoPE base: angle of pair i is pos * theta^(-2i/D)")},
)
