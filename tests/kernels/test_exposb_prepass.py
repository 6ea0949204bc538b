"""ExpoSB's prepass (kernels/exposb_prepass.py) against the reference's transform: q' at the
query positions S - T .. S - 1, k' per query head (its kv head's k with that head's parameters),
any input strides, lengths that are not a multiple of the prepass's rows; the q' the forward
forms itself is the prepass's, to the bit."""

import pytest
import torch

from attnbench.kernels import reference
from attnbench.kernels.exposb_launch import exposb_forward, exposb_transform
from attnbench.tolerance import error_bound, relative_bound
from test_exposb_kernel import random_params

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def transform_params(heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The transform's per-head parameters (the kernel tests' random ones, without the distance decay)."""
    return {name: value for name, value in random_params(heads, head_dim).items() if name != "delta"}


def exact_and_plain(x, positions, params, dtype, group):
    """The reference's x' in float64 at the ``dtype``-rounded x, and plain torch's in ``dtype``."""
    x = x.repeat_interleave(group, dim=2)
    exact = reference.exposb_transform(x.double(), positions, **{n: p.double() for n, p in params.items()})
    plain = reference.exposb_transform(x, positions, **params).double()
    return exact, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [32, 64])
def test_prepass_matches_reference_transform(dtype, d):
    torch.manual_seed(11)
    b, t, s, hq, hkv = 2, 19, 45, 4, 2
    params = {name: value.to(DEVICE) for name, value in transform_params(hq, d).items()}
    params_with_delta = dict(params, delta=torch.zeros(hq, device=DEVICE))
    q = torch.randn(b, t, hq, d, device=DEVICE).to(dtype)
    # k and v side by side, as a fused projection leaves them: k is a strided view
    kv = torch.randn(b, s, 2 * hkv, d, device=DEVICE).to(dtype)
    k = kv[:, :, :hkv]
    q_t, k_t = exposb_transform(q, hq, s - t, params_with_delta), exposb_transform(k, hq, 0, params_with_delta)
    assert q_t.dtype == dtype and k_t.dtype == dtype
    assert k_t.shape == (b, s, hq, d), "k' is per query head"
    cases = (
        ("q'", q_t, q, torch.arange(s - t, s, device=DEVICE), 1),
        ("k'", k_t, k, torch.arange(s, device=DEVICE), hq // hkv),
    )
    for name, got, x, positions, group in cases:
        exact, plain = exact_and_plain(x, positions, params, dtype, group)
        err, magnitude = (got.double() - exact).abs().max().item(), exact.abs().max().item()
        if dtype == torch.float32:
            bound = relative_bound(1e-6, magnitude)  # float32 tables and factors, one rounding per step
        else:  # one rounding of a float32 result; plain torch rounds each factor and product
            bound = error_bound((plain - exact).abs().max().item(), magnitude, dtype)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype}, D={d})"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_the_forward_keeps_the_q_transform_the_prepass_makes(causal):
    torch.manual_seed(12)
    b, t, s, hq, hkv, d = 2, 37, 45, 4, 2, 32  # T not a multiple of the forward's rows, S > T
    params = {name: value.to(DEVICE) for name, value in transform_params(hq, d).items()}
    params["delta"] = torch.full((hq,), 0.01, device=DEVICE)
    qkv = torch.randn(b, s, hq + 2 * hkv, d, device=DEVICE).to(torch.float16)
    q, k, v = qkv[:, s - t :, :hq], qkv[:, :, hq : hq + hkv], qkv[:, :, hq + hkv :]  # strided views
    k_t = exposb_transform(k, hq, 0, params)
    _, _, kept = exposb_forward(q, k_t, v, params, causal, None, torch.float32, keep_q_t=True)
    assert torch.equal(kept, exposb_transform(q, hq, s - t, params)), "the same transform, rounded the same way"
    assert exposb_forward(q, k_t, v, params, causal, None, torch.float16)[2] is None, "not kept unless asked"
