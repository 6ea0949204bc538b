"""deltanet: the chunked WY form and fla's kernel against the recurrence (every gradient,
beta's apart), the delta rule itself, causality, padding, the layer, flops."""

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

from attnbench.models import registry
from attnbench.models.attention import deltanet
from attnbench.tolerance import relative_bound


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # batched tiny triangular solves


def _beta(b=2, t=37, hkv=2):
    return torch.rand(b, t, hkv, dtype=torch.float64)


def test_reference_without_upcast_computes_in_the_inputs_dtype():
    q, k, v = (x.detach().to(torch.bfloat16) for x in random_qkv(b=1, t=40, hq=2, hkv=1, d=16))
    exact = deltanet.torch_reference(*(x.double() for x in (q, k, v)))
    upcast = deltanet.torch_reference(q, k, v)
    low = deltanet.torch_reference(q, k, v, upcast=False)
    assert upcast.dtype == low.dtype == torch.bfloat16
    assert (low.double() - exact).abs().max() > (upcast.double() - exact).abs().max()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [8, 64])  # 37 tokens: a ragged last chunk, and one chunk only
def test_chunked_matches_recurrence(padded, chunk):
    seq_lens = torch.tensor([37, 23]) if padded else None
    assert_matches_reference(
        deltanet.chunked, deltanet.torch_reference, random_qkv(), causal=True, seq_lens=seq_lens, beta=_beta(), chunk=chunk
    )


def test_chunked_runs_in_float32_under_bf16_autocast():
    """Training autocasts to bf16: the chunked form keeps its float32 sums (and its triangular
    solve, which has no bf16 kernel) and matches the float32 recurrence to float32 rounding."""
    q, k, v = (x.detach().float().requires_grad_() for x in random_qkv(b=1, t=40, hq=2, hkv=1, d=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deltanet.chunked(q, k, v, chunk=8)
    out.sum().backward()
    assert out.dtype == torch.float32 and all(torch.isfinite(x.grad).all() for x in (q, k, v))
    torch.testing.assert_close(out, deltanet.torch_reference(q, k, v), atol=1e-5, rtol=1e-5)


def _output_and_beta_grad(run, q, k, v, logits, upstream, **kwargs):
    logits = logits.detach().requires_grad_()
    out = run(q, k, v, beta=torch.sigmoid(logits), **kwargs)
    (grad,) = torch.autograd.grad(out, logits, upstream.to(out.dtype))
    return out.double(), grad.double()


@pytest.mark.parametrize("chunk", [8, 64])
def test_chunked_beta_gradient_matches_recurrence(chunk):
    """The gradient reaching beta's logits (the layer's beta projection), fp32 vs float64."""
    q, k, v = (x.detach() for x in random_qkv())
    logits = torch.randn(2, 37, 2, dtype=torch.float64)
    upstream = torch.randn(2, 37, 4, 16, dtype=torch.float64)
    _, exact = _output_and_beta_grad(deltanet.torch_reference, q, k, v, logits, upstream, chunk=chunk)
    low = [x.float() for x in (q, k, v, logits)]
    _, got = _output_and_beta_grad(deltanet.chunked, *low, upstream, chunk=chunk)
    assert (got - exact).abs().max().item() <= relative_bound(1e-5, exact.abs().max().item())


def test_recurrence_is_the_delta_rule():
    q, k, v = (x.detach() for x in random_qkv(b=1, t=5, hq=1, hkv=1, d=3))
    beta = _beta(1, 5, 1)
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    state = torch.zeros(3, 3, dtype=torch.float64)
    for t in range(5):
        kt = kn[0, t, 0]
        state = state + beta[0, t, 0] * torch.outer(v[0, t, 0] - state @ kt, kt)
    got = deltanet.torch_reference(q, k, v, beta=beta)[0, 4, 0]
    assert torch.allclose(got, state @ qn[0, 4, 0], rtol=1e-12, atol=1e-14)


def test_full_strength_write_stores_the_value_exactly():
    """beta = 1 replaces what the state returns for k_t by v_t: reading with q = k_t gives v_t."""
    q, k, v = (x.detach() for x in random_qkv(b=1, t=9, hq=2, hkv=2, d=8))
    q = k.clone()
    out = deltanet.chunked(q, k, v, beta=torch.ones(1, 9, 2, dtype=torch.float64), chunk=4)
    assert torch.allclose(out, v, rtol=1e-10, atol=1e-12)


def test_chunked_is_causal():
    assert_causal(functools.partial(deltanet.chunked, beta=_beta(1, 41), chunk=8))


def test_padding_zeroes_padded_queries_only():
    assert_padding_zeroes_padded_queries_only(deltanet.chunked, chunk=8)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_layer_trains(impl):
    layer = assert_layer_trains("deltanet", causal=True, options={"chunk": 8}, impl=impl)
    assert layer.beta.out_features == 2  # one write strength per kv head


def test_kernel_level_attend_uses_half_strength_writes():
    layer = registry.build_layer("deltanet", registry.LayerConfig(dim=32, heads=4, kv_heads=2, causal=True, impl="chunked"))
    q, k, v = (x.detach().float() for x in random_qkv(b=1, t=10))
    expected = deltanet.chunked(q, k, v, beta=torch.full((1, 10, 2), 0.5))
    assert torch.equal(layer.attend(q, k, v), expected)


def test_has_no_bidirectional_form():
    with pytest.raises(ValueError, match="causal only"):
        registry.build_layer("deltanet", registry.LayerConfig(dim=32, heads=4, causal=False))


def test_flops_grow_linearly_with_length():
    cfg = registry.LayerConfig(dim=64, heads=4, kv_heads=2, causal=True)
    assert deltanet.MECHANISM.flops(cfg, 1, 8192) == 2 * deltanet.MECHANISM.flops(cfg, 1, 4096)


def test_fla_says_it_takes_no_float32():
    """fla-core 0.6's chunk_delta_rule asserts on float32 inputs: `speed` records unsupported."""
    cfg = registry.LayerConfig(dim=256, heads=4, kv_heads=2, causal=True)
    assert "bf16 or fp16 only" in deltanet._fla_unsupported(cfg, "cuda", torch.float32)
    assert deltanet._fla_unsupported(cfg, "cuda", torch.bfloat16) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fla_matches_recurrence(dtype, monkeypatch):
    pytest.importorskip("fla.ops.delta_rule")
    one_autotune_config(monkeypatch)
    q, k, v = (x.detach().cuda() for x in random_qkv(b=2, t=300, hq=4, hkv=2, d=64))
    assert_matches_reference(
        deltanet.fla_chunk, deltanet.torch_reference, [q, k, v], low=dtype,
        low_reference=functools.partial(deltanet.torch_reference, upcast=False),  # the recurrence's state in the low dtype
        causal=True, seq_lens=torch.tensor([300, 171], device="cuda"), beta=_beta(2, 300).cuda(),
    )
