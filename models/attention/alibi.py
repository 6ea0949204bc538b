"""alibi: softmax attention with linear biases -slope_h * |i - j| (Press et al. 2022), fused
into the score tile, geometric per-head slopes: standard with the alibi position scheme (the
name stays for the command lines that use it)."""

import functools

from attnbench.models import positions
from attnbench.models.pair_flops import softmax_flops
from attnbench.models.registry import Mechanism
from attnbench.models.qkv import qkv_layer
from attnbench.models.softmax import softmax_impls, softmax_options
from attnbench.models.softmax_decode import softmax_decode

MECHANISM = Mechanism(
    name="alibi",
    windowed=True,
    description="softmax attention with ALiBi distance biases (geometric per-head slopes), fused",
    family="exact",
    layer=qkv_layer(functools.partial(softmax_options, natural="alibi"), softmax_impls(natural="alibi")),
    impls=softmax_impls(natural="alibi"),
    flops=softmax_flops,
    position="alibi",
    refuses=positions.standard_with("alibi"),
    decode=softmax_decode(functools.partial(softmax_options, natural="alibi")),
)
