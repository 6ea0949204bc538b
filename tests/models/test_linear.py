"""linear: the chunked form and fla's kernel against the definition; causality; the layer."""

import functools

import pytest
import torch
from subquadratic_checks import assert_causal, assert_layer_trains, assert_matches_reference, exact_fp32_triton_dots, one_autotune_config, random_qkv

from attnbench.models import registry
from attnbench.models.attention import linear


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])  # 37 tokens: a ragged last chunk, and one chunk only
def test_chunked_matches_definition(causal, padded, chunk):
    seq_lens = torch.tensor([37, 23]) if padded else None
    assert_matches_reference(
        linear.chunked, linear.torch_reference, random_qkv(), causal=causal, seq_lens=seq_lens, chunk=chunk
    )


def test_definition_is_normalised_elu_feature_attention():
    q, k, v = (x.detach() for x in random_qkv(b=1, t=5, hq=1, hkv=1, d=3))
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    i = 3  # causal: query 3 sees keys 0..3
    weights = (fq[0, i, 0] * fk[0, : i + 1, 0]).sum(-1)
    expected = (weights[:, None] * v[0, : i + 1, 0]).sum(0) / (weights.sum() + 1e-6)
    got = linear.torch_reference(q, k, v, causal=True)[0, i, 0]
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_feature_map_is_elu_plus_one_without_cancellation(dtype):
    x = torch.tensor([-60.0, -20.0, -6.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    got = linear.feature_map(x.to(dtype)).double()
    assert (got > 0).all(), "elu(x) + 1 is positive everywhere"
    exact = torch.nn.functional.elu(x) + 1  # float64: no cancellation down to -36
    assert torch.allclose(got[1:], exact[1:], rtol=torch.finfo(dtype).eps, atol=0)


def test_gradients_stay_bounded_when_a_query_sees_only_vanishing_features():
    """Token 0 sees only itself: with q_0 = k_0 = -40 its normaliser is ~1e-33. The gradients
    stay O(1) like every other token's (they were ~1e20 in bf16, where the features cancelled to
    0 and 1 / den was 1 / tiny: GPT small's gradient norm went to inf)."""
    q, k, v = (x.detach().to(torch.bfloat16) for x in random_qkv(b=1, t=16, hq=2, hkv=2, d=16))
    q[:, 0], k[:, 0] = -40.0, -40.0
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = linear.chunked(q, k, v, causal=True, chunk=8)
    (out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name, x in zip("qkv", (q, k, v)):
        largest = x.grad.float().abs().max().item()
        assert largest < 1e3, f"d{name} reaches {largest:.3g}"


def test_chunked_is_causal():
    assert_causal(functools.partial(linear.chunked, chunk=8))


def test_all_padded_sequence_gives_zeros():
    q, k, v = (x.detach() for x in random_qkv())
    out = linear.chunked(q, k, v, causal=True, seq_lens=torch.tensor([0, 37]), chunk=8)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_layer_trains(causal, impl):
    assert_layer_trains("linear", causal, {"chunk": 8}, impl=impl)


def test_flops_grow_linearly_with_length():
    cfg = registry.LayerConfig(dim=64, heads=4, causal=True)
    assert linear.MECHANISM.flops(cfg, 1, 8192) == 2 * linear.MECHANISM.flops(cfg, 1, 4096)


def test_fla_says_it_is_causal_only():
    if not torch.cuda.is_available():
        pytest.skip("the CUDA check comes first")
    cfg = registry.LayerConfig(dim=64, heads=4, causal=False)
    assert linear.MECHANISM.impl("fla").why_not(cfg, "cuda", torch.bfloat16) in (
        "fla's chunk_linear_attn is causal only",
        "fla-core is not installed (pip install 'attnbench[peers]')",
    )


@pytest.mark.cuda
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_matches_definition(padded, dtype, monkeypatch):
    pytest.importorskip("fla.ops.linear_attn")
    exact_fp32_triton_dots(monkeypatch, dtype)
    one_autotune_config(monkeypatch)
    q, k, v = (x.detach().cuda() for x in random_qkv(b=2, t=300, hq=4, hkv=2, d=64))
    seq_lens = torch.tensor([300, 171], device="cuda") if padded else None
    assert_matches_reference(linear.fla_chunk, linear.torch_reference, [q, k, v], low=dtype, causal=True, seq_lens=seq_lens)
