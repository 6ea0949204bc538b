"""alibi: softmax attention with linear biases -slope_h * |i - j| (Press et al. 2022),
fused into the score tile; geometric per-head slopes."""

from attnbench.kernels.reference import alibi_slopes
from attnbench.models.pair_flops import softmax_flops
from attnbench.models.registry import LayerConfig, Mechanism
from attnbench.models.qkv import qkv_layer
from attnbench.models.softmax import softmax_impls, window_option


def alibi_options(cfg: LayerConfig) -> dict:
    return {"slopes": alibi_slopes(cfg.heads), **window_option(cfg)}


MECHANISM = Mechanism(
    name="alibi",
    description="softmax attention with ALiBi distance biases (geometric per-head slopes), fused",
    family="exact",
    layer=qkv_layer(alibi_options, softmax_impls(needs_mask=True)),
    impls=softmax_impls(needs_mask=True),
    flops=softmax_flops,
)
