"""Checks shared by the sub-quadratic mechanisms' tests (linear, performer, topk, block, bsbr):
an efficient form against its reference (output and every gradient), causality by
perturbation, and the layer through the registry."""

from __future__ import annotations

import torch

from attnbench.models import registry
from attnbench.models.registry import LayerConfig
from attnbench.tolerance import error_bound, relative_bound


def random_qkv(b=2, t=37, hq=4, hkv=2, d=16, dtype=torch.float64, scale=1.0):
    """Fresh q [B, T, Hq, D], k/v [B, T, Hkv, D] that require grad."""
    q = torch.randn(b, t, hq, d, dtype=dtype) * scale
    k = torch.randn(b, t, hkv, d, dtype=dtype) * scale
    v = torch.randn(b, t, hkv, d, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def _outputs_and_grads(run, inputs, upstream, **kwargs):
    out = run(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
    return [out.double(), *(g.double() for g in grads)]


def assert_matches_reference(efficient, reference, inputs, low=torch.float32, low_reference=None, **kwargs):
    """``efficient`` in ``low`` precision vs ``reference`` in float64: output and every input
    gradient, same upstream gradient. Tolerance: float32, 1e-5 of the quantity's largest
    magnitude (observed: ~1e-6); fp16/bf16 (FlashAttention rule), at most 2x the error of the
    reference itself run in ``low`` (``low_reference``: the reference computing in ``low``, for
    one that upcasts internally), plus the rounding floor (attnbench.tolerance)."""
    low_inputs = [x.detach().to(low).requires_grad_() for x in inputs]
    # float64 at the same low-precision inputs and upstream gradient (FlashAttention's method):
    # the comparison is of arithmetic, not of the inputs' rounding
    exact_inputs = [x.detach().double().requires_grad_() for x in low_inputs]
    upstream = torch.randn_like(reference(*exact_inputs, **kwargs)).to(low).double()
    exact = _outputs_and_grads(reference, exact_inputs, upstream, **kwargs)
    got = _outputs_and_grads(efficient, low_inputs, upstream, **kwargs)
    ref_low = got if low == torch.float32 else _outputs_and_grads(low_reference or reference, low_inputs, upstream, **kwargs)
    labels = ["output", "dq", "dk", "dv"] + [f"d(input {i})" for i in range(3, len(inputs))]
    assert len(exact) == len(got) == len(ref_low) == len(labels), "an output or gradient went missing"
    for label, e, r, g in zip(labels, exact, ref_low, got):
        assert g.shape == e.shape, f"{label}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        err = (g - e).abs().max().item()
        scale = e.abs().max().item()
        torch_err = (r - e).abs().max().item()
        bound = relative_bound(1e-5, scale) if low == torch.float32 else error_bound(torch_err, scale, low)
        assert err <= bound, f"{label}: error {err:.3g} > bound {bound:.3g}"


def exact_fp32_triton_dots(monkeypatch, dtype: torch.dtype) -> None:
    """For an fla comparison in float32: fla's kernels take Triton's default dot precision, TF32
    for fp32 inputs (10-bit mantissa, ~1e-3 relative), which no float32 bound survives.
    TRITON_F32_DEFAULT=ieee (part of Triton's cache key) makes them compute in fp32, so the
    float32 comparison checks fla's function at float32's bound and the bf16 one its precision."""
    if dtype == torch.float32:
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")


def one_autotune_config(monkeypatch) -> None:
    """For a correctness comparison on a fresh GPU machine: every Triton autotuner compiles and
    runs only the first config its own pruning keeps. fla lists up to 48 configs per kernel, and
    compiling them all took minutes per test (the GPU runs' limits cut the fla tests); what is
    compared is fla's function, which each of its configs computes."""
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    monkeypatch.setattr(Autotuner, "prune_configs", lambda self, kwargs: prune(self, kwargs)[:1])


def assert_causal(run, t_changed=20, **kwargs):
    """Changing token t_changed's q, k and v never changes outputs before it (float64, to
    rounding), and does change the output at t_changed."""
    q, k, v = (x.detach() for x in random_qkv(b=1, t=41))
    before = run(q, k, v, causal=True, **kwargs)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, t_changed] += 3 * torch.randn_like(x[:, t_changed])
    after = run(q2, k2, v2, causal=True, **kwargs)
    leak = (after[:, :t_changed] - before[:, :t_changed]).abs().max().item()
    assert leak <= 1e-12 * before.abs().max().item(), f"token {t_changed} changed earlier outputs by {leak}"
    assert not torch.allclose(after[:, t_changed], before[:, t_changed]), "the changed token's own output did not move"


def assert_padding_zeroes_padded_queries_only(run, t=37, valid=23, **kwargs):
    """A causal core with seq_lens [t, valid]: the full sequence is untouched, the padded
    one agrees with the unpadded run before ``valid`` (causal: padding lies only ahead)
    and is exactly zero from there on."""
    q, k, v = (x.detach() for x in random_qkv(t=t))
    full = run(q, k, v, **kwargs)
    padded = run(q, k, v, seq_lens=torch.tensor([t, valid]), **kwargs)
    assert torch.equal(padded[0], full[0])
    assert torch.allclose(padded[1, :valid], full[1, :valid], rtol=1e-12, atol=0)
    assert torch.equal(padded[1, valid:], torch.zeros_like(padded[1, valid:]))


def assert_layer_trains(name: str, causal: bool, options: dict | None = None, impl: str = "torch", t: int = 19):
    """The layer through the registry: output shape, finite, gradient on every parameter."""
    cfg = LayerConfig(dim=32, heads=4, kv_heads=2, causal=causal, impl=impl, options=options or {})
    layer = registry.build_layer(name, cfg)
    x = torch.randn(2, t, 32)
    y = layer(x, seq_lens=torch.tensor([t, t - 6]))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {pname}"
    return layer
