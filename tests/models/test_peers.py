"""The SDPA and FlexAttention adapters compute the same function as the reference for
every softmax-family option (CPU: sdpa default dispatch, sdpa-math, flex uncompiled)."""

import functools

import pytest
import torch

from attnbench.kernels import reference
from attnbench.models import peers
from attnbench.models.softmax import torch_reference

OPTION_SETS = {
    "plain": {},
    "window": {"window": (3, 2)},
    "alibi": {"slopes": reference.alibi_slopes(4)},
    "rope": {"theta": 10000.0, "offset": 5},
}


def adapters():
    from torch.nn.attention import SDPBackend

    return {
        "sdpa": peers.sdpa,
        "sdpa-math": functools.partial(peers.sdpa, backend=SDPBackend.MATH),
        "flex-eager": functools.partial(peers.flex, compiled=False),
    }


@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("adapter", ["sdpa", "sdpa-math", "flex-eager"])
def test_adapter_matches_reference(adapter, options, causal, padded):
    torch.manual_seed(0)
    b, t, hq, hkv, d = 2, 9, 4, 2, 16
    q = torch.randn(b, t, hq, d, dtype=torch.float64)
    k, v = (torch.randn(b, t, hkv, d, dtype=torch.float64) for _ in range(2))
    seq_lens = torch.tensor([9, 4]) if padded else None
    kwargs = dict(causal=causal, seq_lens=seq_lens, **OPTION_SETS[options])
    expected = torch_reference(q, k, v, **kwargs)
    run = adapters()[adapter]
    got = run(q.float(), k.float(), v.float(), **kwargs).double()
    err = (got - expected).abs().max().item()
    assert err < 1e-5, f"{adapter} differs from the reference by {err}"


def test_cross_attention_causal_is_bottom_right_aligned():
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) for _ in range(2))
    full = reference.attention(q, k, v, causal=False)
    causal = reference.attention(q, k, v, causal=True)
    # the last query sits at the last key's position: it sees every key
    assert torch.allclose(full[:, -1], causal[:, -1])
    assert not torch.allclose(full[:, 0], causal[:, 0])
    assert torch.allclose(peers.sdpa(q, k, v, causal=True), causal)


def test_query_with_no_visible_key_gives_zeros():
    q, k, v = (torch.randn(2, 4, 2, 8) for _ in range(3))
    out = reference.attention(q, k, v, seq_lens=torch.tensor([0, 4]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()


def test_alibi_slopes_are_the_geometric_sequence():
    assert torch.allclose(reference.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert reference.alibi_slopes(6).shape == (6,)
