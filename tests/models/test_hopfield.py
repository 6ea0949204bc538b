"""hopfield: the SDPA form against the definition, the softmax-attention identity, repeated
update steps, causality, the layer (learned positive beta), flops."""

import functools

import pytest
import torch
from subquadratic_checks import assert_causal, assert_layer_trains, assert_matches_reference, random_qkv

from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.attention import hopfield


def _beta(heads=4):
    return (0.5 + torch.rand(heads)) * 16**-0.5  # around the softmax value 1/sqrt(D), D = 16


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n_steps", [1, 3])
def test_sdpa_matches_definition(causal, padded, n_steps):
    seq_lens = torch.tensor([37, 23]) if padded else None
    assert_matches_reference(
        hopfield.sdpa_steps, hopfield.torch_reference, random_qkv(),
        causal=causal, seq_lens=seq_lens, beta=_beta(), n_steps=n_steps,
    )


@pytest.mark.parametrize("run", [hopfield.torch_reference, hopfield.sdpa_steps])
@pytest.mark.parametrize("causal", [False, True])
def test_one_step_at_inverse_sqrt_d_is_softmax_attention(run, causal):
    q, k, v = (x.detach() for x in random_qkv())
    seq_lens = torch.tensor([37, 23])
    beta = torch.full((4,), 16**-0.5)
    softmax = reference.attention(q, k, v, causal=causal, seq_lens=seq_lens)
    got = run(q, k, v, causal=causal, seq_lens=seq_lens, beta=beta, n_steps=1)
    assert torch.allclose(got, softmax, rtol=1e-12, atol=1e-12)


def test_fresh_layer_is_the_standard_layer():
    """A hopfield layer starts at beta = 1/sqrt(D), one step: the standard softmax layer with the same weights."""
    cfg = registry.LayerConfig(dim=32, heads=4, kv_heads=2, causal=True)
    layer = registry.build_layer("hopfield", cfg).double()
    standard = registry.build_layer("standard", cfg).double()
    standard.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    # log_beta was created in float32: beta is 1/sqrt(D) to float32 rounding (~1e-7 relative)
    assert torch.allclose(layer(x), standard(x), rtol=1e-6, atol=1e-9)


def test_two_steps_retrieve_from_the_keys_then_read_the_values():
    q, k, v = (x.detach() for x in random_qkv(b=1, t=7, hq=1, hkv=1, d=5))
    beta = torch.tensor([0.7], dtype=torch.float64)
    xi = torch.softmax(0.7 * q[0, :, 0] @ k[0, :, 0].T, dim=-1) @ k[0, :, 0]  # (T, D): retrieved patterns
    expected = torch.softmax(0.7 * xi @ k[0, :, 0].T, dim=-1) @ v[0, :, 0]
    got = hopfield.sdpa_steps(q, k, v, beta=beta, n_steps=2)[0, :, 0]
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_large_beta_retrieves_the_nearest_stored_pattern():
    k = torch.nn.functional.normalize(torch.randn(1, 16, 1, 32, dtype=torch.float64), dim=-1) * 4
    v = torch.randn(1, 16, 1, 32, dtype=torch.float64)
    q = k[:, [5]] + 0.3 * torch.randn(1, 1, 1, 32, dtype=torch.float64)  # a noisy probe of pattern 5
    got = hopfield.sdpa_steps(q, k, v, beta=torch.tensor([8.0]), n_steps=3)
    assert torch.allclose(got[0, 0, 0], v[0, 5, 0], atol=1e-6)


def test_sdpa_is_causal():
    assert_causal(functools.partial(hopfield.sdpa_steps, beta=_beta(), n_steps=2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_layer_trains_its_beta(causal, impl):
    layer = assert_layer_trains("hopfield", causal, {"n_steps": 2}, impl=impl)
    beta = layer.core_options()["beta"]
    assert beta.shape == (4,) and (beta > 0).all()
    assert torch.allclose(beta, torch.full((4,), 8**-0.5))  # D = 32 / 4


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="n_steps"):
        registry.build_layer("hopfield", registry.LayerConfig(dim=32, heads=4, options={"n_steps": 0}))


def test_flops_are_softmax_flops_per_step():
    cfg = registry.LayerConfig(dim=64, heads=4, causal=True, options={"n_steps": 3})
    assert hopfield.MECHANISM.flops(cfg, 2, 10) == 3 * 4 * 4 * 16 * 2 * 55
