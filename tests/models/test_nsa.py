"""nsa: the chunked form and fla's kernel against the definition, each branch on its own,
the block selection, causality, padding, the layer, flops."""

import functools

import pytest
import torch
from one_cpu_thread import one_cpu_thread  # noqa: F401
from subquadratic_checks import (
    assert_causal,
    assert_layer_trains,
    assert_matches_reference,
    assert_padding_zeroes_padded_queries_only,
    one_autotune_config,
    random_qkv,
)

from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.attention import nsa

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # many tiny gathers per query chunk

SMALL = {"block": 8, "topn": 4, "window": 12}  # 64 tokens: 8 blocks, 4 selected of which 3 forced; 12 keys + the query slide


def _gates(b, t, hq):
    return torch.rand(b, t, hq, 3, dtype=torch.float64)


def _only(branch, b, t, hq):
    gates = torch.zeros(b, t, hq, 3, dtype=torch.float64)
    gates[..., branch] = 1
    return gates


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [8, 13])  # aligned with the blocks, and not
def test_chunked_matches_definition(padded, chunk):
    seq_lens = torch.tensor([61, 30]) if padded else None
    assert_matches_reference(
        nsa.chunked, nsa.torch_reference, random_qkv(t=61),
        causal=True, seq_lens=seq_lens, gates=_gates(2, 61, 4), chunk=chunk, **SMALL,
    )


def test_sliding_branch_is_windowed_softmax():
    q, k, v = (x.detach() for x in random_qkv(t=40))
    got = nsa.chunked(q, k, v, gates=_only(2, 2, 40, 4), chunk=8, **SMALL)
    expected = reference.attention(q, k, v, causal=True, window=(12, 0))
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-13)


def test_compressed_branch_attends_to_complete_past_block_means():
    q, k, v = (x.detach() for x in random_qkv(b=1, t=30, hq=1, hkv=1, d=4))
    got = nsa.chunked(q, k, v, gates=_only(0, 1, 30, 1), chunk=8, **SMALL)
    t = 23  # blocks 0 and 1 end at 7 and 15 <= 23; block 2 ends at 23 <= 23: three blocks
    k_cmp, v_cmp = (x[0, :24, 0].view(3, 8, 4).mean(1) for x in (k, v))
    probs = torch.softmax(k_cmp @ q[0, t, 0] / 2, dim=0)
    assert torch.allclose(got[0, t, 0], probs @ v_cmp, rtol=1e-12, atol=1e-14)
    assert torch.equal(got[0, :7], torch.zeros_like(got[0, :7])), "no block is complete before token 7"


def test_selected_branch_sees_forced_and_best_blocks_only():
    """Query 60 (block 7) with topn = 4: blocks 0, 6, 7 forced, plus the best-scoring other block."""
    q, k, v = (x.detach() for x in random_qkv(b=1, t=64, hq=2, hkv=1, d=8))
    got = nsa.chunked(q, k, v, gates=_only(1, 1, 64, 2), chunk=8, **SMALL)
    t = 60
    k_cmp = k[0, :, 0].view(8, 8, 8).mean(1)
    probs = torch.softmax(q[0, t] @ k_cmp[:7].T / 8**0.5, dim=-1).mean(0)  # blocks 0..6 are complete; mean over the group
    best = max((1, 2, 3, 4, 5), key=lambda c: probs[c])
    keys = torch.cat([torch.arange(c * 8, min(c * 8 + 8, t + 1)) for c in sorted((0, best, 6, 7))])
    expected = reference.attention(q[:, t : t + 1], k[:, keys], v[:, keys])
    assert torch.allclose(got[:, t : t + 1], expected, rtol=1e-12, atol=1e-13)


def test_chunked_is_causal():
    assert_causal(functools.partial(nsa.chunked, gates=_gates(1, 41, 4), chunk=8, **SMALL))


def test_padding_zeroes_padded_queries_only():
    assert_padding_zeroes_padded_queries_only(nsa.chunked, t=40, gates=_gates(2, 40, 4), chunk=8, **SMALL)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_layer_trains(impl):
    layer = assert_layer_trains("nsa", causal=True, options={**SMALL, "chunk": 8}, impl=impl, t=29)
    assert layer.gates.out_features == 3 * 4  # three gates per query head


def test_window_option_follows_the_config():
    cfg = registry.LayerConfig(dim=32, heads=4, causal=True, window=100)
    assert nsa.nsa_options(cfg)["window"] == 100


def test_fla_needs_a_large_power_of_two_group():
    why = nsa.IMPLS["fla"].unsupported
    assert "power of two >= 16" in why(registry.LayerConfig(dim=64, heads=8, kv_heads=2), "cuda", torch.bfloat16)
    assert why(registry.LayerConfig(dim=1024, heads=16, kv_heads=1), "cuda", torch.bfloat16) is None


def test_flops_count_each_branch():
    cfg = registry.LayerConfig(dim=64, heads=4, causal=True, options={"block": 4, "topn": 2, "window": 3})
    seen = torch.arange(1, 11)  # 10 tokens
    pairs = (seen // 4).sum() + seen.clamp(max=8).sum() + seen.clamp(max=4).sum()  # sliding: 3 keys before + the query
    assert nsa.MECHANISM.flops(cfg, 2, 10) == 4 * 4 * 16 * 2 * int(pairs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fla_matches_definition(dtype, monkeypatch):
    pytest.importorskip("fla.ops.nsa")
    one_autotune_config(monkeypatch)
    q, k, v = (x.detach().cuda() for x in random_qkv(b=2, t=300, hq=16, hkv=1, d=64))
    assert_matches_reference(
        nsa.fla_parallel, nsa.torch_reference, [q, k, v], low=dtype, causal=True,
        seq_lens=torch.tensor([300, 171], device="cuda"), gates=_gates(2, 300, 16).cuda(), block=32, topn=4, window=64,
    )
