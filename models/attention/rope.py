"""rope: softmax attention with rotary position embeddings (Su et al. 2021), rotate-half
convention: standard with the rope position scheme (the name stays for the command lines that
use it). Our impl rotates q and k in one Triton pass before its kernels, and its backward
kernels rotate dq and dk back in their epilogues (kernels/flash_rope.py); the peers rotate in torch."""

import functools

from attnbench.models import positions
from attnbench.models.pair_flops import softmax_flops
from attnbench.models.registry import Mechanism
from attnbench.models.qkv import qkv_layer
from attnbench.models.softmax import softmax_impls, softmax_options
from attnbench.models.softmax_decode import softmax_decode

MECHANISM = Mechanism(
    name="rope",
    windowed=True,
    description="softmax attention with rotary position embeddings (rotate-half)",
    family="exact",
    layer=qkv_layer(functools.partial(softmax_options, natural="rope"), softmax_impls(natural="rope")),
    impls=softmax_impls(natural="rope"),
    flops=softmax_flops,
    position="rope",
    refuses=positions.standard_with("rope"),
    params=positions.PARAMS["rope"],
    decode=softmax_decode(functools.partial(softmax_options, natural="rope")),
)
