"""performer: chunked form against the definition, causality, the softmax approximation
improving with more features, orthogonal features, redraw, the layer."""

import functools

import pytest
import torch
from subquadratic_checks import assert_causal, assert_layer_trains, assert_matches_reference, random_qkv

from attnbench.kernels import reference
from attnbench.models.attention import performer
from attnbench.tolerance import relative_bound


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_matches_definition(causal, padded):
    projection = performer.orthogonal_features(24, 16)
    seq_lens = torch.tensor([37, 23]) if padded else None
    assert_matches_reference(
        performer.chunked, performer.torch_reference, random_qkv(),
        causal=causal, seq_lens=seq_lens, projection=projection, chunk=8,
    )


def test_chunked_is_causal():
    assert_causal(functools.partial(performer.chunked, projection=performer.orthogonal_features(24, 16), chunk=8))


def test_padded_keys_are_ignored_whatever_their_values():
    q, k, v = (x.detach() for x in random_qkv())
    projection = performer.orthogonal_features(32, 16)
    seq_lens = torch.tensor([37, 20])
    k2, v2 = k.clone(), v.clone()
    k2[1, 20:] = 1e3  # would overflow exp if padded keys were not excluded
    v2[1, 20:] = torch.randn_like(v2[1, 20:])
    for causal in (False, True):
        before = performer.chunked(q, k, v, causal=causal, seq_lens=seq_lens, projection=projection, chunk=8)
        after = performer.chunked(q, k2, v2, causal=causal, seq_lens=seq_lens, projection=projection, chunk=8)
        assert torch.isfinite(after).all()
        assert torch.allclose(before, after, rtol=1e-10, atol=1e-12)


def test_approximation_of_softmax_improves_with_more_features():
    torch.manual_seed(0)  # the features come from the global generator: other tests must not move it
    q, k, v = (x.detach() for x in random_qkv(b=1, t=64, hq=2, hkv=2, d=16, scale=0.5))
    exact = reference.attention(q, k, v)
    errors = []
    for features in (16, 128, 1024):
        trials = [
            (performer.chunked(q, k, v, projection=performer.orthogonal_features(features, 16).double()) - exact)
            .square().mean().sqrt().item()
            for _ in range(8)
        ]
        errors.append(sum(trials) / len(trials))
    assert errors[0] > errors[1] > errors[2], f"errors by feature count: {errors}"
    assert errors[2] < errors[0] / 4, f"error falls too slowly with features (Monte Carlo: ~1/sqrt(M)): {errors}"


def test_feature_rows_are_orthogonal_within_a_block_and_gaussian_sized():
    w = performer.orthogonal_features(40, 16).double()  # blocks of 16, 16, 8 rows
    for block in (w[:16], w[16:32], w[32:]):
        gram = block @ block.T
        off_diagonal = gram - torch.diag(gram.diagonal())
        assert off_diagonal.abs().max().item() <= relative_bound(1e-5, gram.diagonal().max().item())
    norms = performer.orthogonal_features(4096, 16).norm(dim=1)
    assert abs(norms.square().mean().item() - 16) < 1.0  # E|g|^2 = D for g ~ N(0, I_D)


def test_layer_redraws_every_n_training_steps_and_saves_its_features():
    torch.manual_seed(0)
    layer = assert_layer_trains("performer", causal=True, options={"features": 24, "redraw_every": 2, "chunk": 8})
    assert "projection" in layer.state_dict()
    x = torch.randn(1, 9, 32)
    seen = [layer.projection.clone()]
    for _ in range(4):
        layer(x)
        seen.append(layer.projection.clone())
    # one step was taken by assert_layer_trains: redraws before steps 3 and 5
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, True, False, True], changed
    layer.eval()
    frozen = layer.projection.clone()
    for _ in range(3):
        layer(x)
    assert torch.equal(layer.projection, frozen), "eval mode must not redraw"


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_layer_trains_bidirectional(impl):
    assert_layer_trains("performer", causal=False, options={"features": 24}, impl=impl)


def test_features_must_be_positive():
    from attnbench.models import registry

    with pytest.raises(ValueError, match="features"):
        registry.build_layer("performer", registry.LayerConfig(dim=32, heads=4, options={"features": 0}))
