"""stickbreaking: the chunked form and fla's kernel against the definition, the definition
itself, where the unused stick goes, stability, causality, padding, the layer, flops."""

import functools

import pytest
import torch
from subquadratic_checks import (
    assert_causal,
    assert_layer_trains,
    assert_matches_reference,
    assert_padding_zeroes_padded_queries_only,
    exact_fp32_triton_dots,
    one_autotune_config,
    random_qkv,
)

from attnbench.models import registry
from attnbench.models.attention import stickbreaking
from attnbench.tolerance import relative_bound


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])  # 37 tokens: a ragged last chunk, and one chunk only
def test_chunked_matches_definition(attend_current, padded, chunk):
    seq_lens = torch.tensor([37, 23]) if padded else None
    assert_matches_reference(
        stickbreaking.chunked, stickbreaking.torch_reference, random_qkv(),
        causal=True, seq_lens=seq_lens, attend_current=attend_current, chunk=chunk,
    )


@pytest.mark.parametrize("attend_current", [False, True])
def test_definition_breaks_the_stick_from_the_nearest_key(attend_current):
    q, k, v = (x.detach() for x in random_qkv(b=1, t=6, hq=1, hkv=1, d=4))
    i = 4
    last = i if attend_current else i - 1
    beta = torch.sigmoid((q[0, i, 0] * k[0, :, 0]).sum(-1) / 2)  # sigmoid(z_ij), sqrt(D) = 2
    expected = torch.zeros(4, dtype=torch.float64)
    for j in range(last + 1):
        weight = beta[j] * torch.prod(1 - beta[j + 1 : last + 1])
        expected += weight * v[0, j, 0]
    got = stickbreaking.torch_reference(q, k, v, attend_current=attend_current)[0, i, 0]
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


def test_unused_stick_goes_nowhere():
    """With every value 1, a query's output is its total weight: the stick it broke off,
    1 - prod_l (1 - sigmoid(z_il)) (telescoping), not 1."""
    q, k, _ = (x.detach() for x in random_qkv(b=1, t=9, hq=2, hkv=2, d=8))
    ones = torch.ones(1, 9, 2, 8, dtype=torch.float64)
    out = stickbreaking.chunked(q, k, ones, chunk=4)
    z = torch.einsum("bihd,bjhd->bhij", q, k) / 8**0.5  # (1, H, T, T)
    earlier = torch.ones(9, 9, dtype=torch.bool).tril(-1)
    left = torch.where(earlier, 1 - torch.sigmoid(z), torch.ones_like(z)).prod(-1)  # (1, H, T)
    assert torch.allclose(out[..., 0], (1 - left).transpose(1, 2), rtol=1e-12, atol=1e-14)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])), "the first query sees no key"


def test_large_logits_stay_finite_and_exact():
    q, k, v = (x.detach() for x in random_qkv(b=1, t=33, scale=6.0))  # |z| up to ~100: sigmoid saturates
    exact = stickbreaking.torch_reference(q, k, v)
    got = stickbreaking.chunked(q.float(), k.float(), v.float(), chunk=8)
    assert torch.isfinite(got).all()
    assert (got.double() - exact).abs().max().item() <= relative_bound(1e-5, exact.abs().max().item())


def test_chunked_is_causal():
    assert_causal(functools.partial(stickbreaking.chunked, chunk=8))


def test_padding_zeroes_padded_queries_only():
    assert_padding_zeroes_padded_queries_only(stickbreaking.chunked, chunk=8)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_layer_trains(impl):
    assert_layer_trains("stickbreaking", causal=True, options={"chunk": 8}, impl=impl)


def test_has_no_bidirectional_form():
    with pytest.raises(ValueError, match="causal only"):
        registry.build_layer("stickbreaking", registry.LayerConfig(dim=32, heads=4, causal=False))


def test_flops_count_earlier_keys_only():
    cfg = registry.LayerConfig(dim=64, heads=4, causal=True)  # D = 16
    assert stickbreaking.MECHANISM.flops(cfg, 2, 10) == 4 * 4 * 16 * 2 * 45  # 45 = 10 * 9 / 2 pairs j < i
    cfg.options["attend_current"] = True
    assert stickbreaking.MECHANISM.flops(cfg, 2, 10) == 4 * 4 * 16 * 2 * 55
    padded = stickbreaking.MECHANISM.flops(cfg, 2, 10, seq_lens=torch.tensor([10, 4]))
    assert padded == 4 * 4 * 16 * (55 + 10 + 6 * 4)  # sequence 1: 10 pairs among 4 real keys, 6 padded queries see 4


@pytest.mark.cuda
@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_matches_definition(attend_current, dtype, monkeypatch):
    pytest.importorskip("fla.ops.stickbreaking_attn")
    exact_fp32_triton_dots(monkeypatch, dtype)
    one_autotune_config(monkeypatch)
    q, k, v = (x.detach().cuda() for x in random_qkv(b=2, t=300, hq=4, hkv=2, d=64))
    assert_matches_reference(
        stickbreaking.fla_parallel, stickbreaking.torch_reference, [q, k, v], low=dtype,
        causal=True, seq_lens=torch.tensor([300, 171], device="cuda"), attend_current=attend_current,
    )
