"""The registry: discovery, lookups with helpful errors, availability reasons."""

import pytest
import torch

from attnbench.models import registry
from attnbench.models.registry import LayerConfig, UnknownNameError

EXACT = ["standard", "rope", "alibi", "window"]


def test_exact_family_is_registered_with_every_peer():
    found = registry.mechanisms()
    for name in EXACT:
        assert name in found, f"{name} missing from the registry"
        assert {"triton", "torch", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex"} <= set(
            found[name].impls
        )


def test_unknown_mechanism_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid: .*standard"):
        registry.get("nope")


def test_unknown_impl_lists_valid_impls():
    with pytest.raises(UnknownNameError, match="valid: .*sdpa-cudnn"):
        registry.get("standard").impl("cutlass")


def test_heads_must_divide():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        LayerConfig(dim=64, heads=4, kv_heads=3)


def test_cuda_impls_say_why_not_on_cpu():
    cfg = LayerConfig(dim=64, heads=4)
    standard = registry.get("standard")
    assert standard.impl("torch").why_not(cfg, "cpu", torch.float32) is None
    assert "CUDA" in standard.impl("sdpa-cudnn").why_not(cfg, "cpu", torch.float32)
    assert "CUDA" in standard.impl("triton").why_not(cfg, "cpu", torch.float32)


def test_flash_backend_refuses_masks_and_fp32():
    if not torch.cuda.is_available():
        pytest.skip("the dtype/mask reasons come after the CUDA check")
    cfg = LayerConfig(dim=64, heads=4)
    assert "fp16 or bf16" in registry.get("standard").impl("sdpa-flash").why_not(cfg, "cuda", torch.float32)
    assert "mask" in registry.get("alibi").impl("sdpa-flash").why_not(cfg, "cuda", torch.bfloat16)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("causal", [False, True])
def test_layer_runs_and_every_parameter_gets_a_gradient(name, causal):
    layer = registry.build_layer(name, LayerConfig(dim=32, heads=4, kv_heads=2, causal=causal, window=3))
    x = torch.randn(2, 7, 32)
    y = layer(x, seq_lens=torch.tensor([7, 5]))
    assert y.shape == x.shape
    y.square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {pname}"
