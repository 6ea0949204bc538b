"""Every causal layer in the registry, whole (its scorers, gates, token-conditioned options and
position scheme included, not just its core): changing token t's input never changes an output
before t, and does change the output at t. A core-level check (subquadratic_checks.assert_causal)
cannot see a leak through what the layer computes around the core: learned once scored a query
block by all its queries, so a block's later tokens moved its earlier rows."""

from __future__ import annotations

import pytest
import torch

from attnbench.models import registry
from attnbench.models.registry import LayerConfig

CAUSAL = [name for name, mechanism in registry.mechanisms().items() if mechanism.causal]
T, CHANGED = 41, 23  # awkward against every block and chunk size below (blocks of 8, chunks of 8)
SMALL = {"block": 8, "chunk": 8, "window": 12}  # several blocks or chunks before token CHANGED


@pytest.mark.parametrize("name", CAUSAL)
@torch.no_grad()
def test_no_output_depends_on_a_later_token(name):
    mechanism = registry.get(name)
    options = {key: value for key, value in SMALL.items() if key in mechanism.params}
    cfg = LayerConfig(dim=32, heads=4, kv_heads=2, causal=True, options=options)
    if mechanism.why_not(cfg):  # GQA refused: one kv head a query head
        cfg = LayerConfig(dim=32, heads=4, causal=True, options=options)
    torch.manual_seed(0)
    layer = registry.build_layer(name, cfg).double().eval()
    if hasattr(layer, "scorer"):  # learned: gates that depend on the block means (at its open bias every gate is open)
        layer.scorer.bias.zero_()
    x = torch.randn(1, T, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, CHANGED] += 3 * torch.randn(32, dtype=torch.float64)
    before, after = layer(x), layer(changed)
    leak = (after[:, :CHANGED] - before[:, :CHANGED]).abs().max().item()
    assert leak <= 1e-12 * before.abs().max().item(), f"{name}: token {CHANGED} changed earlier outputs by {leak:.3g}"
    assert not torch.allclose(after[:, CHANGED], before[:, CHANGED]), f"{name}: the changed token's own output did not move"
