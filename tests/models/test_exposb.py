"""The exposb mechanism: registry entry, layer parameters and their parametrisation, the
layer end to end on the Triton kernel (interpreted on CPU) against the torch reference,
and the unfused flex alternative."""

import dataclasses
import math

import pytest
import torch

from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.attention.exposb import PARAMETERS, flex_exposb
from attnbench.models.pair_flops import softmax_flops
from attnbench.models.registry import LayerConfig
from attnbench.tolerance import relative_bound

RAW_NAMES = [f"raw_{name}" for name in PARAMETERS]


def test_registry_entry():
    mechanism = registry.get("exposb")
    assert mechanism.family == "exact" and mechanism.position == "inside"
    assert set(mechanism.impls) == {"triton", "torch", "flex"}
    assert mechanism.impls["triton"].needs_cuda and mechanism.impls["flex"].needs_cuda
    cfg = LayerConfig(dim=64, heads=4, causal=True)
    assert mechanism.flops(cfg, 2, 100) == softmax_flops(cfg, 2, 100)
    triton = mechanism.impls["triton"]
    assert "head_dim" in triton.unsupported(LayerConfig(dim=80, heads=1), torch.device("cuda"), torch.bfloat16)
    assert triton.unsupported(LayerConfig(dim=64, heads=1), torch.device("cuda"), torch.bfloat16) is None


def test_default_initial_values():
    layer = registry.build_layer("exposb", LayerConfig(dim=64, heads=2))  # head_dim 32
    values = {name: value.detach() for name, value in layer.core_options().items()}
    expected = {"lam": -math.log(0.98), "alpha": 0.1, "beta": 1.0, "gamma": 0.0, "mu": 16.0, "sigma": 8.0, "delta": 0.001}
    for name, want in expected.items():
        assert values[name].shape == (2,)
        assert torch.allclose(values[name], torch.full((2,), want), rtol=1e-6, atol=0), name


def test_options_override_initial_values():
    options = {"decay_factor": 0.9, "alpha": -0.3, "beta": 2.0, "gamma": 0.5, "mu": 3.0, "sigma": 1.5, "delta": 0.0}
    layer = registry.build_layer("exposb", LayerConfig(dim=64, heads=4, options=options))
    values = {name: value.detach() for name, value in layer.core_options().items()}
    assert torch.allclose(values["lam"], torch.full((4,), -math.log(0.9)))
    for name in ("alpha", "beta", "gamma", "mu", "sigma"):
        assert torch.allclose(values[name], torch.full((4,), options[name])), name
    assert torch.equal(values["delta"], torch.zeros(4)), "delta = 0 must switch the decay off exactly"


@pytest.mark.parametrize(
    "options", [{"decay_factor": 1.0}, {"decay_factor": 0.0}, {"sigma": 0.0}, {"delta": -0.1}, {"theta": 5.0}], ids=str
)
def test_bad_options_are_rejected(options):
    with pytest.raises(ValueError):
        registry.build_layer("exposb", LayerConfig(dim=32, heads=2, options=options))


def test_gradients_reach_all_seven_parameters():
    torch.manual_seed(0)
    # gamma != 0, or mu and sigma have no effect and rightly get no gradient
    layer = registry.build_layer("exposb", LayerConfig(dim=64, heads=4, kv_heads=2, causal=True, options={"gamma": 0.5}))
    layer(torch.randn(2, 12, 64), seq_lens=torch.tensor([12, 7])).square().sum().backward()
    for name in RAW_NAMES:
        grad = getattr(layer, name).grad
        assert grad is not None and grad.shape == (4,), name
        assert (grad != 0).all(), f"{name} gets no gradient in some head"


def test_parametrisation_keeps_positive_values_positive():
    layer = registry.build_layer("exposb", LayerConfig(dim=32, heads=2))
    optimizer = torch.optim.SGD(layer.parameters(), lr=50.0)
    for _ in range(5):  # steps that would drive lam, sigma, delta far below zero if stored as they are
        optimizer.zero_grad()
        options = layer.core_options()
        (options["lam"] + options["sigma"] + options["delta"]).sum().backward()
        optimizer.step()
    options = layer.core_options()
    assert options["lam"].detach().max() < -math.log(0.98), "the steps did not push lam down"
    for name in ("lam", "sigma", "delta"):
        assert (options[name] > 0).all(), f"{name} left the positive range"


def test_triton_layer_matches_torch_layer():
    """The layer end to end on the Triton kernel (interpreted on CPU): output and raw-parameter
    gradients, through the softplus, equal the torch layer's in fp32."""
    torch.manual_seed(1)
    options = {"gamma": 0.5, "alpha": 0.4, "delta": 0.05}
    cfg = LayerConfig(dim=128, heads=4, kv_heads=2, causal=False, options=options)  # head_dim 32
    layers = {impl: registry.build_layer("exposb", dataclasses.replace(cfg, impl=impl)) for impl in ("torch", "triton")}
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(2, 24, 128)
    upstream = torch.randn(2, 24, 128)
    seq_lens = torch.tensor([24, 17])
    outputs = {}
    for impl, layer in layers.items():
        outputs[impl] = layer(x, seq_lens=seq_lens)
        outputs[impl].backward(upstream)
    assert (outputs["triton"] - outputs["torch"]).abs().max().item() <= relative_bound(1e-4, outputs["torch"].abs().max().item())
    for name in RAW_NAMES + ["qkv.weight"]:
        got, want = layers["triton"].get_parameter(name).grad, layers["torch"].get_parameter(name).grad
        assert (got - want).abs().max().item() <= relative_bound(1e-4, want.abs().max().item()), name


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_flex_forward_matches_reference(causal):
    torch.manual_seed(2)
    b, t, hq, hkv, d = 2, 11, 4, 2, 16
    q = torch.randn(b, t, hq, d)
    k, v = torch.randn(b, t, hkv, d), torch.randn(b, t, hkv, d)
    layer = registry.build_layer("exposb", LayerConfig(dim=64, heads=hq, options={"gamma": 0.5, "delta": 0.1}))
    with torch.no_grad():  # FlexAttention has no backward on CPU
        params = layer.core_options()
        seq_lens = torch.tensor([11, 6])
        want = reference.exposb_attention(q.double(), k.double(), v.double(), **{n: p.double() for n, p in params.items()}, causal=causal, seq_lens=seq_lens)
        got = flex_exposb(q, k, v, **params, causal=causal, seq_lens=seq_lens, compiled=False)
    assert (got.double() - want).abs().max() <= 1e-5


@pytest.mark.cuda
def test_cuda_flex_gradients_match_reference():
    torch.manual_seed(3)
    layer = registry.build_layer("exposb", LayerConfig(dim=512, heads=8, kv_heads=2, causal=True, options={"gamma": 0.5})).cuda()
    q = torch.randn(2, 256, 8, 64, device="cuda", requires_grad=True)
    k, v = (torch.randn(2, 256, 2, 64, device="cuda", requires_grad=True) for _ in range(2))
    results = {}
    for name, fn in (("flex", flex_exposb), ("torch", reference.exposb_attention)):
        params = layer.core_options()
        out = fn(q, k, v, **params, causal=True)
        inputs = [q, k, v, *(getattr(layer, raw) for raw in RAW_NAMES)]
        results[name] = (out, torch.autograd.grad(out.square().sum(), inputs))
    assert (results["flex"][0] - results["torch"][0]).abs().max() <= 1e-3
    for label, got, want in zip(["q", "k", "v", *RAW_NAMES], results["flex"][1], results["torch"][1]):
        assert (got - want).abs().max().item() <= relative_bound(1e-3, want.abs().max().item()), label
