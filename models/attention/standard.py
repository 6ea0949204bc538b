"""standard: exact softmax attention (Vaswani et al. 2017); needs absolute positions in the model."""

from attnbench.models.pair_flops import softmax_flops
from attnbench.models.registry import Mechanism
from attnbench.models.qkv import qkv_layer
from attnbench.models.softmax import softmax_impls, window_option

MECHANISM = Mechanism(
    name="standard",
    description="exact softmax attention; positions come from the model's absolute embeddings",
    family="exact",
    layer=qkv_layer(window_option, softmax_impls()),
    impls=softmax_impls(),
    flops=softmax_flops,
    position="absolute",
)
