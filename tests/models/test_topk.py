"""topk: the chunked form against the definition, the selection itself, causality, the layer, flops."""

import functools

import pytest
import torch
from subquadratic_checks import assert_causal, assert_layer_trains, assert_matches_reference, random_qkv

from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.attention import topk


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("keep,chunk", [(5, 8), (64, 16)])  # 64 > 37 keys: every visible key is kept
def test_chunked_matches_definition(causal, padded, keep, chunk):
    seq_lens = torch.tensor([37, 11]) if padded else None
    assert_matches_reference(
        topk.chunked, topk.torch_reference, random_qkv(), causal=causal, seq_lens=seq_lens, topk=keep, chunk=chunk
    )


@pytest.mark.parametrize("causal", [False, True])
def test_keeping_every_key_is_softmax_attention(causal):
    q, k, v = (x.detach() for x in random_qkv())
    seq_lens = torch.tensor([37, 11])
    dense = reference.attention(q, k, v, causal=causal, seq_lens=seq_lens)
    assert torch.allclose(topk.chunked(q, k, v, causal=causal, seq_lens=seq_lens, topk=37, chunk=8), dense, atol=1e-12)


def test_a_query_attends_to_its_best_keys_only():
    q, k, v = (x.detach() for x in random_qkv(b=1, t=12, hq=1, hkv=1, d=8))
    out = topk.chunked(q, k, v, topk=3, chunk=4)
    i = 5
    scores = (q[0, i, 0] * k[0, :, 0]).sum(-1) / 8**0.5
    best = scores.topk(3).indices
    expected = reference.attention(q[:, i : i + 1], k[:, best], v[:, best])
    assert torch.allclose(out[:, i : i + 1], expected, atol=1e-12)


def test_chunked_is_causal():
    assert_causal(functools.partial(topk.chunked, topk=4, chunk=8))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_layer_trains(causal, impl):
    assert_layer_trains("topk", causal, {"topk": 4, "chunk": 8}, impl=impl)


def test_flops_count_all_scores_and_kept_pairs():
    cfg = registry.LayerConfig(dim=64, heads=4, causal=True, options={"topk": 2})
    per_pair = 2 * 4 * 16
    # 4 tokens causal: 1+2+3+4 = 10 scores; kept 1+2+2+2 = 7
    assert topk.MECHANISM.flops(cfg, 1, 4) == per_pair * 17
    bidirectional = registry.LayerConfig(dim=64, heads=4, causal=False, options={"topk": 2})
    # lengths 4 and 1: scores 16 + 4, kept 8 + 4
    assert topk.MECHANISM.flops(bidirectional, 2, 4, seq_lens=torch.tensor([4, 1])) == per_pair * 32
