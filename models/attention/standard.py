"""standard: exact softmax attention (Vaswani et al. 2017); positions from the model's learned
embeddings unless another scheme is asked for (any of models/positions.py, fused by every impl)."""

from attnbench.models.pair_flops import softmax_flops
from attnbench.models.registry import Mechanism
from attnbench.models.qkv import qkv_layer
from attnbench.models.softmax import softmax_impls, softmax_options
from attnbench.models.softmax_decode import softmax_decode

MECHANISM = Mechanism(
    name="standard",
    windowed=True,
    description="exact softmax attention; positions come from the model's absolute embeddings",
    family="exact",
    layer=qkv_layer(softmax_options, softmax_impls()),
    impls=softmax_impls(),
    flops=softmax_flops,
    decode=softmax_decode(softmax_options),
)
