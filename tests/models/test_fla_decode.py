"""fla's fused_recurrent one-token steps, the peers of `speed --mode decode` for linear attention
and DeltaNet, compute the same step as the plain-torch ones (models/state_decode.py): both impls
are built from one seed, so they draw the same token and state (drawn in float32, then rounded). Needs CUDA and fla-core.
Tolerance: 2x plain torch's own bf16 error against the float32 step (attnbench.tolerance)."""

from __future__ import annotations

import pytest
import torch

from attnbench.models import registry
from attnbench.models.fla import fla_missing
from attnbench.models.registry import LayerConfig
from attnbench.tolerance import error_bound

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("mechanism, ops", [("linear", "linear_attn"), ("deltanet", "delta_rule")])
def test_fla_step_equals_the_plain_torch_step(mechanism, ops):
    if not torch.cuda.is_available() or fla_missing(ops)():
        pytest.skip("needs CUDA and fla-core")
    cfg = LayerConfig(dim=512, heads=4, kv_heads=4, head_dim=64, causal=True)
    impls = registry.mechanisms()[mechanism].decode.impls

    def run(impl, dtype):
        torch.manual_seed(0)
        out = impls[impl].build(cfg, 3, 100, 1, "cuda", dtype)()
        return out.reshape(3, cfg.heads, cfg.head_dim).double()

    exact, plain, fla = run("torch", torch.float32), run("torch", torch.bfloat16), run("fla", torch.bfloat16)
    error, bound = (fla - exact).abs().max().item(), error_bound((plain - exact).abs().max().item(), exact.abs().max().item(), torch.bfloat16)
    assert error <= bound, f"{mechanism} fla step: max error {error:.3g} > bound {bound:.3g}"
