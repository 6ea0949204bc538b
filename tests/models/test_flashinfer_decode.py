"""FlashInfer's paged decode, an optional peer of `speed --mode decode` for the softmax family:
where it is installed (CUDA), one step over a shuffled paged cache with ragged lengths, GQA, a
window and RoPE equals the definition (models/decode.py's softmax_step) within 2x plain torch's
own bf16 error (attnbench.tolerance); everywhere, the cases it cannot take are rows with a reason."""

from __future__ import annotations

import pytest
import torch

from attnbench.models import registry
from attnbench.models.decode import paginate, softmax_step
from attnbench.models.registry import LayerConfig
from attnbench.models.softmax_decode import flashinfer_missing, flashinfer_decode
from attnbench.tolerance import error_bound


@pytest.mark.cuda
@pytest.mark.parametrize("window, theta", [(None, None), (40, None), (None, 10000.0)])
def test_flashinfer_step_equals_the_definition(window, theta):
    if not torch.cuda.is_available() or flashinfer_missing():
        pytest.skip("needs CUDA and flashinfer")
    torch.manual_seed(0)
    lengths = torch.tensor([1, 70, 129, 200], dtype=torch.int32, device="cuda")  # ragged, across pages of 16
    q = torch.randn(4, 1, 8, 64, device="cuda")
    k, v = (torch.randn(4, 200, 2, 64, device="cuda") for _ in range(2))
    (k_pages, table), (v_pages, _) = (paginate(x, lengths, 16, torch.Generator().manual_seed(1), spare=3) for x in (k, v))
    exact = softmax_step(q, k, v, lengths, window=window, theta=theta)
    plain = softmax_step(*(x.bfloat16() for x in (q, k, v)), lengths, window=window, theta=theta).float()
    step = flashinfer_decode(q.bfloat16(), k_pages.bfloat16(), v_pages.bfloat16(), table, lengths, window=window, theta=theta)
    got = step().float()
    error = (got - exact).abs().max().item()
    bound = error_bound((plain - exact).abs().max().item(), exact.abs().max().item(), torch.bfloat16)
    assert error <= bound, f"flashinfer window={window} theta={theta}: max error {error:.3g} > bound {bound:.3g}"


def test_what_flashinfer_cannot_take_is_a_reason():
    impl = registry.get("standard").decode.impls["flashinfer"]
    cfg = LayerConfig(dim=64, heads=4, head_dim=16, causal=True)
    cuda = torch.device("cuda")
    if flashinfer_missing() is None:
        assert "one new query" in impl.unsupported(cfg, 2, cuda, torch.bfloat16)
        assert "fp16 or bf16" in impl.unsupported(cfg, 1, cuda, torch.float32)
    else:
        assert "flashinfer is not installed" in impl.why_not(cfg, 1, cuda, torch.bfloat16)
    alibi = registry.get("alibi").decode.impls["flashinfer"]
    assert "ALiBi" in alibi.unsupported(cfg, 1, cuda, torch.bfloat16)
