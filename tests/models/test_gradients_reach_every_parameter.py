"""Nothing counted as trainable is dead: every parameter a mechanism's layer lists as requiring a
gradient receives a nonzero one, causal and bidirectional, with the impl training would choose
on this machine. A second step is checked, not the first: exposb's mu and sigma start where their
gradient is exactly 0 (its decay's shape at init) and move only once the rest has moved."""

import pytest
import torch

from attnbench.models import registry
from attnbench.models.registry import LayerConfig

T = 64
SMALL = {"bsbr": {"chunk": 16}, "nsa": {"block": 16, "topn": 2, "chunk": 16}, "learned": {"block": 16}}  # several chunks/blocks in T


def cells():
    for name, mechanism in registry.mechanisms().items():
        for causal in (True, False):
            cfg = LayerConfig(dim=64, heads=4, causal=causal, options=SMALL.get(name, {}))
            if mechanism.why_not(cfg) is None:
                yield pytest.param(name, causal, id=f"{name}-{'causal' if causal else 'bidir'}")


@pytest.mark.parametrize("name, causal", list(cells()))
def test_every_trainable_parameter_receives_a_gradient(name, causal):
    mechanism = registry.get(name)
    cfg = LayerConfig(dim=64, heads=4, causal=causal, options=SMALL.get(name, {}))
    impl = mechanism.preferred_impl(cfg, "cpu", torch.float32)
    layer = registry.build_layer(name, LayerConfig(dim=64, heads=4, causal=causal, impl=impl, options=SMALL.get(name, {})))
    layer.train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(2, T, 64)).float().pow(2).mean().backward()
        optimizer.step()
    trainable = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable
    dead = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"{name}/{impl}: trainable parameters without a gradient: {dead}"
