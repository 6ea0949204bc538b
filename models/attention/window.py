"""window: sliding-window softmax attention (Longformer/Mistral style). Causal: each query
sees the w keys before it and itself; bidirectional: w on each side. Whole tiles outside
the window are skipped, so the cost is O(T * w)."""

import dataclasses

from attnbench.models.flops import softmax_flops
from attnbench.models.registry import LayerConfig, Mechanism
from attnbench.models.qkv import qkv_layer
from attnbench.models.softmax import softmax_impls, window_option

DEFAULT_WINDOW = 1024


def sliding_options(cfg: LayerConfig) -> dict:
    if cfg.window is None:
        cfg = dataclasses.replace(cfg, window=DEFAULT_WINDOW)
    return window_option(cfg)


MECHANISM = Mechanism(
    name="window",
    description="sliding-window softmax attention (left window w causal, w each side bidirectional)",
    family="sparse",
    layer=qkv_layer(sliding_options, softmax_impls(needs_mask=True)),
    impls=softmax_impls(needs_mask=True),
    flops=softmax_flops,
    position="absolute",
    params={"window": (DEFAULT_WINDOW, "keys visible on each side (left only when causal); --window sets it")},
)
