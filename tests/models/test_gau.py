"""gau: the FLASH mixed-chunk form against the quadratic definition (output and gradients),
the one-chunk causal case as plain quadratic GAU, causality, padding, the layer, flops."""

import pytest
import torch
from subquadratic_checks import assert_matches_reference

from attnbench.models import registry
from attnbench.models.attention import gau


def _split(run):
    """run on q [B, T, 2, S] = (q_quad, q_lin), k [B, T, 2, S] = (k_quad, k_lin), v [B, T, 1, E]."""
    def wrapped(q, k, v, **kwargs):
        return run(q[:, :, 0], k[:, :, 0], q[:, :, 1], k[:, :, 1], v[:, :, 0], **kwargs)[:, :, None]
    return wrapped


def _inputs(b=2, t=37, s=8, e=12):
    q, k = (torch.randn(b, t, 2, s, dtype=torch.float64) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, torch.randn(b, t, 1, e, dtype=torch.float64))]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])  # 37 tokens: a ragged last chunk, and one chunk only
def test_mixed_chunk_matches_definition(causal, padded, chunk):
    seq_lens = torch.tensor([37, 23]) if padded else None
    assert_matches_reference(
        _split(gau.mixed_chunk), _split(gau.quadratic), _inputs(), causal=causal, seq_lens=seq_lens, chunk=chunk
    )


def test_one_causal_chunk_is_plain_quadratic_gau():
    q, k, v = (x.detach() for x in _inputs(b=1, t=9))
    got = gau.mixed_chunk(q[:, :, 0], k[:, :, 0], q[:, :, 1], k[:, :, 1], v[:, :, 0], causal=True, chunk=9)
    i = 6
    weights = torch.relu(k[0, : i + 1, 0] @ q[0, i, 0] / 9).square()  # relu(q . k / T)^2, keys 0..i
    assert torch.allclose(got[0, i], weights @ v[0, : i + 1, 0], rtol=1e-12, atol=1e-14)


def test_bidirectional_linear_part_spans_the_whole_sequence():
    q, k, v = (x.detach() for x in _inputs(b=1, t=12))
    q_lin, k_lin, values = q[0, :, 1], k[0, :, 1], v[0, :, 0]
    zeros = torch.zeros_like(q[:, :, 0])  # no quadratic part: relu(0)^2 = 0
    got = gau.mixed_chunk(zeros, zeros, q[:, :, 1], k[:, :, 1], v[:, :, 0], causal=False, chunk=4)
    assert torch.allclose(got[0], q_lin @ (k_lin.T @ values) / 12, rtol=1e-12, atol=1e-14)


def _layer(causal, impl, chunk=8):
    cfg = registry.LayerConfig(dim=16, heads=1, causal=causal, impl=impl, options={"chunk": chunk, "qk_dim": 8})
    return registry.build_layer("gau", cfg).double()


@pytest.mark.parametrize("causal", [False, True])
def test_layer_impls_agree_and_every_parameter_learns(causal):
    torch.manual_seed(0)
    reference = _layer(causal, "torch")
    chunked = _layer(causal, "chunked")
    chunked.load_state_dict(reference.state_dict())
    with torch.no_grad():  # scales ~ 1, so that the relu^2 weights are not negligible
        scales = reference.gamma / 0.02
        for layer in (reference, chunked):
            layer.gamma.copy_(scales)
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    seq_lens = torch.tensor([19, 13])
    outs = [layer(x, seq_lens) for layer in (reference, chunked)]
    assert outs[0].shape == x.shape
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(outs[0][1, :13], outs[1][1, :13], rtol=1e-10, atol=1e-12)
    outs[1].square().sum().backward()
    for name, p in chunked.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_layer_is_causal():
    layer = _layer(True, "chunked")
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 17] += 3 * torch.randn(16, dtype=torch.float64)
    before, after = layer(x), layer(x2)
    assert (after[:, :17] - before[:, :17]).abs().max() <= 1e-12 * before.abs().max()
    assert not torch.allclose(after[:, 17], before[:, 17])


def test_padded_tokens_do_not_change_real_outputs():
    layer = _layer(False, "chunked")
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 14:] = torch.randn(1, 6, 16, dtype=torch.float64)
    lens = torch.tensor([14])
    assert torch.allclose(layer(x, lens)[:, :14], layer(x2, lens)[:, :14], rtol=1e-12, atol=1e-14)
    assert torch.allclose(layer(x, lens)[:, :14], layer(x[:, :14])[:, :14], rtol=1e-12, atol=1e-14)


def test_has_no_gqa_and_no_core():
    assert not gau.MECHANISM.has_core
    with pytest.raises(ValueError, match="GQA"):
        registry.build_layer("gau", registry.LayerConfig(dim=32, heads=4, kv_heads=2))


def test_flops_grow_linearly_with_length():
    cfg = registry.LayerConfig(dim=64, heads=1, causal=True)
    assert gau.MECHANISM.flops(cfg, 1, 8192) == 2 * gau.MECHANISM.flops(cfg, 1, 4096)
