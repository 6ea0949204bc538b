"""FLOP counts against brute-force pair counts (reference.visible) and projection shapes."""

import pytest
import torch

from attnbench import flops
from attnbench.kernels import reference
from attnbench.models import registry
from attnbench.models.registry import LayerConfig


def brute_force_pairs(t, *, causal, window, seq_lens=None):
    return int(reference.visible(t, t, causal=causal, window=window, seq_lens=seq_lens).sum())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 3, 40])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("mode, factor", [("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)])
def test_softmax_flops_count_exactly_the_visible_pairs(causal, window, heads, kv_heads, mode, factor):
    t, batch, d = 37, 3, 16
    cfg = LayerConfig(dim=heads * d, heads=heads, kv_heads=kv_heads, causal=causal, window=window)
    expected = factor * 4 * batch * heads * d * brute_force_pairs(t, causal=causal, window=cfg.window_bounds)
    assert flops.core_flops(registry.get("standard"), cfg, batch, t, mode) == expected


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_padding_removes_the_padded_keys_pairs(causal, window):
    t, heads, d = 29, 4, 8
    seq_lens = torch.tensor([29, 17, 1])
    cfg = LayerConfig(dim=heads * d, heads=heads, causal=causal, window=window)
    expected = 4 * heads * d * brute_force_pairs(t, causal=causal, window=cfg.window_bounds, seq_lens=seq_lens)
    got = flops.core_flops(registry.get("standard"), cfg, len(seq_lens), t, "fwd", seq_lens=seq_lens)
    assert got == expected
    assert got < flops.core_flops(registry.get("standard"), cfg, len(seq_lens), t, "fwd")


@pytest.mark.parametrize("mode, factor", [("fwd", 1), ("bwd", 2), ("fwdbwd", 3)])
def test_layer_linears_count_two_flops_per_multiply_add(mode, factor):
    heads, kv_heads, d, b, t = 8, 2, 16, 2, 11
    c = heads * d
    layer = registry.build_layer("standard", LayerConfig(dim=c, heads=heads, kv_heads=kv_heads))
    x = torch.randn(b, t, c)
    qkv_out = (heads + 2 * kv_heads) * d  # fused q/k/v projection under GQA
    expected = factor * 2 * b * t * (c * qkv_out + c * c)
    assert flops.linear_flops(layer, lambda: layer(x), mode) == expected


def test_tflops_per_s():
    assert flops.tflops_per_s(3e12, 1500.0) == pytest.approx(2.0)


def test_a_models_attention_flops_are_its_layers_forward_cores():
    """distill's attn_flops column: every layer's core forward, brute-force pairs."""
    t, batch, heads, d, layers = 23, 2, 4, 8, 3
    cfg = LayerConfig(dim=heads * d, heads=heads, causal=True)
    expected = layers * 4 * batch * heads * d * brute_force_pairs(t, causal=True, window=None)
    assert flops.attention_flops(registry.get("standard"), cfg, layers, batch, t) == expected


def test_the_convention_sentence_states_the_factors_in_use():
    assert f"Backward = {registry.SOFTMAX_BACKWARD:g}x forward" in flops.CONVENTION
    assert f"{registry.MATMUL_BACKWARD:g}x for bsbr, deltanet, gau, linear, performer" in flops.CONVENTION
    assert f"(backward {flops.LINEAR_MODE_FACTOR['bwd']:g}x)" in flops.CONVENTION


@pytest.mark.parametrize("name, backward", [("standard", 2.5), ("topk", 2.5), ("linear", 2.0), ("deltanet", 2.0), ("bsbr", 2.0)])
def test_each_mechanism_backward_has_its_own_factor(name, backward):
    """The softmax family recomputes its scores in the backward (2.5x); matmul-only forms do not (2x)."""
    cfg = LayerConfig(dim=64, heads=4, causal=True)
    mechanism = registry.get(name)
    forward = flops.core_flops(mechanism, cfg, 2, 48, "fwd")
    assert forward > 0
    assert flops.core_flops(mechanism, cfg, 2, 48, "bwd") == pytest.approx(backward * forward)
    assert flops.core_flops(mechanism, cfg, 2, 48, "fwdbwd") == pytest.approx((1 + backward) * forward)


@pytest.mark.parametrize("mode, factor", [("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)])
def test_a_packs_flops_are_its_sequences_and_padding_costs_the_longest_for_each(mode, factor):
    """Lengths 3 and 5, causal, Hq = 2, D = 4: packed 3*4/2 + 5*6/2 = 21 pairs, padded 2 x 15 = 30."""
    cfg = LayerConfig(dim=8, heads=2, causal=True)
    packed, padded = flops.varlen_flops(registry.get("standard"), cfg, [3, 5], mode)
    assert packed == factor * 4 * 2 * 4 * 21
    assert padded == factor * 4 * 2 * 4 * 30


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 4])
def test_padding_a_pack_costs_more_unless_its_lengths_are_equal(causal, window):
    cfg = LayerConfig(dim=32, heads=4, causal=causal, window=window)
    standard = registry.get("standard")
    packed, padded = flops.varlen_flops(standard, cfg, [9, 2, 17], "fwd")
    expected = sum(4 * 4 * 8 * brute_force_pairs(t, causal=causal, window=cfg.window_bounds) for t in (9, 2, 17))
    assert packed == expected < padded == flops.core_flops(standard, cfg, 3, 17, "fwd")
    assert flops.varlen_flops(standard, cfg, [11, 11], "fwd") == (flops.core_flops(standard, cfg, 2, 11, "fwd"),) * 2


def test_a_packs_projections_count_on_its_tokens_and_on_the_padded_batch():
    cfg = LayerConfig(dim=8, heads=2, causal=False)
    core_packed, core_padded = flops.varlen_flops(registry.get("standard"), cfg, [3, 5], "fwd")
    packed, padded = flops.varlen_flops(registry.get("standard"), cfg, [3, 5], "fwd", per_token=10.0)
    assert (packed, padded) == (core_packed + 10.0 * 8, core_padded + 10.0 * 2 * 5)
