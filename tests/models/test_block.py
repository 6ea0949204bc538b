"""block: the SDPA form against the block-by-block definition, what a query sees, the layer, flops."""

import functools

import pytest
import torch
from subquadratic_checks import assert_causal, assert_layer_trains, assert_matches_reference, random_qkv

from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.attention import block


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("size", [8, 37, 64])  # 37 tokens: ragged tail, exactly one block, block > T
def test_sdpa_matches_definition(causal, padded, size):
    seq_lens = torch.tensor([37, 12]) if padded else None  # sequence 1 ends mid block 1, blocks 2..4 all padding
    assert_matches_reference(
        block.sdpa_blocks, block.torch_reference, random_qkv(), causal=causal, seq_lens=seq_lens, block=size
    )


@pytest.mark.parametrize("causal", [False, True])
def test_a_query_sees_exactly_its_own_block(causal):
    q, k, v = (x.detach() for x in random_qkv(b=1, t=20))
    out = block.sdpa_blocks(q, k, v, causal=causal, block=8)
    # tokens 8..15 form block 1: the same as attention over those tokens alone
    alone = reference.attention(q[:, 8:16], k[:, 8:16], v[:, 8:16], causal=causal)
    assert torch.allclose(out[:, 8:16], alone, rtol=1e-12, atol=1e-12)
    # the first token of a block sees no earlier token, unlike a sliding window
    window = reference.attention(q, k, v, causal=True, window=(7, 0))
    assert not torch.allclose(out[:, 8], window[:, 8])


def test_sdpa_is_causal():
    assert_causal(functools.partial(block.sdpa_blocks, block=8))


def test_all_padding_blocks_give_zeros():
    q, k, v = (x.detach() for x in random_qkv())
    out = block.sdpa_blocks(q, k, v, causal=False, seq_lens=torch.tensor([37, 5]), block=8)
    assert torch.equal(out[1, 8:], torch.zeros_like(out[1, 8:]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_layer_trains(causal, impl):
    assert_layer_trains("block", causal, {"block": 8}, impl=impl)


def test_flops_count_pairs_within_blocks():
    cfg = registry.LayerConfig(dim=64, heads=4, causal=True, options={"block": 4})
    per_pair = 4 * 4 * 16
    # 10 tokens, blocks of 4, 4, 2: causal pairs 10 + 10 + 3
    assert block.MECHANISM.flops(cfg, 1, 10) == per_pair * 23
    # padding to 5 real keys: block 0 causal 10 pairs, block 1 has 1 real key seen by 4 queries
    assert block.MECHANISM.flops(cfg, 1, 10, seq_lens=torch.tensor([5])) == per_pair * 14
