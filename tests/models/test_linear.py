"""linear: the chunked form and fla's kernel against the definition; causality; the layer."""

import functools

import pytest
import torch
from subquadratic_checks import assert_causal, assert_layer_trains, assert_matches_reference, random_qkv

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
    expected = (weights[:, None] * v[0, : i + 1, 0]).sum(0) / weights.sum()
    got = linear.torch_reference(q, k, v, causal=True)[0, i, 0]
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


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
        "fla-core is not installed (pip install attnbench[peers])",
    )


@pytest.mark.cuda
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_matches_definition(padded, dtype):
    pytest.importorskip("fla.ops.linear_attn")
    q, k, v = (x.detach().cuda() for x in random_qkv(b=2, t=300, hq=4, hkv=2, d=64))
    seq_lens = torch.tensor([300, 171], device="cuda") if padded else None
    assert_matches_reference(linear.fla_chunk, linear.torch_reference, [q, k, v], low=dtype, causal=True, seq_lens=seq_lens)
