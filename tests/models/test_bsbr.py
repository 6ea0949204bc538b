"""bsbr: the batched form against the chunk-by-chunk definition (inputs and learned maps),
the two parts of the output, causality, the layer, flops."""

import functools

import pytest
import torch
from subquadratic_checks import assert_causal, assert_layer_trains, assert_matches_reference, random_qkv

from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.attention import bsbr

D = 16


def learned_maps(compression: int, dtype=torch.float64) -> dict:
    """Random (not identity) meta maps, and compression matrices when compression > 1."""
    maps = {"meta_query": torch.randn(D, D, dtype=dtype) / D**0.5, "meta_key": torch.randn(D, D, dtype=dtype) / D**0.5}
    if compression > 1:
        size = D * D // compression
        maps["compress"] = torch.randn(D * D, size, dtype=dtype) / D
        maps["decompress"] = torch.randn(size, D * D, dtype=dtype) / size**0.5
    return maps


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("compression", [1, 4])
def test_chunked_matches_definition(causal, padded, compression):
    seq_lens = torch.tensor([37, 13]) if padded else None  # sequence 1: chunk 1 part-padded, chunks 2..4 all padding
    assert_matches_reference(
        bsbr.chunked, bsbr.torch_reference, random_qkv(),
        causal=causal, seq_lens=seq_lens, chunk=8, **learned_maps(compression),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_of_learned_maps_match_definition(causal):
    q, k, v = (x.detach() for x in random_qkv())
    maps = {name: m.requires_grad_() for name, m in learned_maps(4).items()}
    grads = []
    for run in (bsbr.torch_reference, bsbr.chunked):
        out = run(q, k, v, causal=causal, seq_lens=torch.tensor([37, 20]), chunk=8, **maps)
        grads.append(torch.autograd.grad(out.square().sum(), list(maps.values())))
    for name, expected, got in zip(maps, *grads):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), f"gradient of {name} differs"


def test_output_is_own_chunk_attention_plus_earlier_chunk_state():
    q, k, v = (x.detach() for x in random_qkv(b=1, t=12, hq=1, hkv=1, d=D))
    maps = learned_maps(1)
    out = bsbr.chunked(q, k, v, causal=True, chunk=4, **maps)
    i = 6  # chunk 1: it sees chunk 0 only, so its retrieval weight is 1
    local = reference.attention(q[:, 4 : i + 1], k[:, 4 : i + 1], v[:, 4 : i + 1], causal=True)[:, -1]
    state = k[0, :4, 0].T @ v[0, :4, 0] / 4
    far = q[0, i, 0] / D**0.5 @ state
    assert torch.allclose(out[0, i, 0], local[0, 0] + far, atol=1e-12)
    # chunk 0 retrieves nothing: pure causal softmax attention
    assert torch.allclose(out[:, :4], reference.attention(q[:, :4], k[:, :4], v[:, :4], causal=True), atol=1e-12)


def test_chunked_is_causal():
    assert_causal(functools.partial(bsbr.chunked, chunk=8, **learned_maps(4)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("compression", [1, 4])
def test_layer_trains(causal, impl, compression):
    layer = assert_layer_trains("bsbr", causal, {"chunk": 4, "compression": compression}, impl=impl)
    assert (layer.compress is not None) == (compression > 1)


def test_bad_compression_is_refused():
    with pytest.raises(ValueError, match="compression"):
        registry.build_layer("bsbr", registry.LayerConfig(dim=32, heads=4, options={"compression": 3}))


def test_flops_are_block_attention_plus_retrieval():
    from attnbench.models.attention import block

    cfg = registry.LayerConfig(dim=64, heads=4, causal=True, options={"chunk": 4})
    local = block.MECHANISM.flops(registry.LayerConfig(dim=64, heads=4, causal=True, options={"block": 4}), 1, 12)
    d = 16  # 12 tokens, 3 chunks, 3 causal chunk pairs
    retrieval = 4 * (4 * d * d * 12 + 4 * d * d * 3 + (2 * d + 2 * d * d) * 3)
    assert bsbr.MECHANISM.flops(cfg, 1, 12) == local + retrieval
