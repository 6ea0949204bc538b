"""The fused one-token steps (kernels/state_decode.py) against the plain-torch steps
(models/state_decode.py, themselves tested against the full causal forwards in
tests/models/test_decode.py): output and the updated state, on states that hold a prefix.

Under TRITON_INTERPRET=1 value tiles are at least 16 columns, so Dv = 40 spans three blocks
with a ragged last one. Tolerance: float32 relative to the largest value; fp16/bf16 inputs at
most 2x plain torch's error with the same inputs (attnbench.tolerance).
"""

from __future__ import annotations

import pytest
import torch

from attnbench.kernels import state_decode as fused
from attnbench.models import state_decode as reference
from attnbench.tolerance import error_bound, relative_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOLERANCE = 1e-5

SHAPES = {  # (B, Hq, Hkv, Dk, Dv)
    "mha": (2, 2, 2, 32, 32),
    "gqa-4:2": (2, 4, 2, 16, 40),
    "mqa-3:1-odd-dims": (1, 3, 1, 24, 20),
    "dk-wider-than-dv": (2, 2, 1, 64, 16),
}


def _tokens(shape, dtype, prefix=9, seed=0):
    """One new token (q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv], beta [B, Hkv]) and a prefix of
    ``prefix`` tokens (k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], beta [B, T, Hkv]) for the state."""
    b, hq, hkv, dk, dv = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(dtype)

    token = randn(b, hq, dk), randn(b, hkv, dk), randn(b, hkv, dv), torch.rand(b, hkv, generator=g, dtype=torch.float64).to(dtype)
    prefix = randn(b, prefix, hkv, dk), randn(b, prefix, hkv, dv), torch.rand(b, prefix, hkv, generator=g, dtype=torch.float64).to(dtype)
    return token, prefix


def _assert_close(label, got, exact, plain=None):
    assert got.shape == exact.shape, f"{label}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{label}: non-finite"
    error = (got.double().cpu() - exact).abs().max().item()
    magnitude = exact.abs().max().item()
    if plain is None:
        bound = relative_bound(FP32_TOLERANCE, magnitude)
    else:
        bound = error_bound((plain.double() - exact).abs().max().item(), magnitude, got.dtype)
    assert error <= bound, f"{label}: max error {error:.3g} > bound {bound:.3g}"


def _on_device(*xs):
    return [x.to(DEVICE) for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear_step_matches_reference(shape, dtype):
    (q, k, v, _), (pk, pv, _) = _tokens(SHAPES[shape], dtype)
    exact_o, exact_state = reference.linear_step(
        *(x.double() for x in (q, k, v)), reference.linear_state(pk.double(), pv.double(), torch.float64)
    )
    plain_o, _ = reference.linear_step(q, k, v, reference.linear_state(pk, pv))
    kv, k_sum = _on_device(*reference.linear_state(pk, pv))
    o = fused.linear_step(*_on_device(q, k, v), kv, k_sum)
    assert o.dtype == dtype
    _assert_close("o", o, exact_o, None if dtype == torch.float32 else plain_o)
    _assert_close("kv", kv, exact_state.kv)
    _assert_close("k_sum", k_sum, exact_state.k_sum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("with_beta", [True, False])
def test_deltanet_step_matches_reference(shape, dtype, with_beta):
    (q, k, v, beta), (pk, pv, pbeta) = _tokens(SHAPES[shape], dtype)
    beta = beta if with_beta else None
    exact_o, exact_state = reference.deltanet_step(
        *(x.double() for x in (q, k, v)), reference.deltanet_state(pk.double(), pv.double(), pbeta.double(), torch.float64),
        None if beta is None else beta.double(),
    )
    plain_o, _ = reference.deltanet_step(q, k, v, reference.deltanet_state(pk, pv, pbeta), beta)
    (state,) = _on_device(reference.deltanet_state(pk, pv, pbeta))
    o = fused.deltanet_step(*_on_device(q, k, v), state, None if beta is None else beta.to(DEVICE))
    assert o.dtype == dtype
    _assert_close("o", o, exact_o, None if dtype == torch.float32 else plain_o)
    _assert_close("state", state, exact_state)


def test_steps_from_the_empty_state_follow_the_reference_token_by_token():
    """Twelve fused steps from S = 0 (GQA, strided q/k/v views of one projection) give the
    reference's rows and final states: the in-place updates carry over from step to step."""
    b, hq, hkv, d, t = 2, 4, 2, 16, 12
    qkv = torch.randn(b, t, hq + 2 * hkv, d, dtype=torch.float64)
    q, k, v = qkv.split([hq, hkv, hkv], dim=2)
    beta = torch.rand(b, t, hkv, dtype=torch.float64)
    ref_linear = reference.linear_state(k[:, :0], v[:, :0], torch.float64)
    ref_delta = reference.deltanet_state(k[:, :0], v[:, :0], dtype=torch.float64)
    kv, k_sum = (x.float().to(DEVICE) for x in ref_linear)
    state = ref_delta.float().to(DEVICE)
    q32, k32, v32 = (x.float().to(DEVICE) for x in (q, k, v))
    for i in range(t):
        exact, ref_linear = reference.linear_step(q[:, i], k[:, i], v[:, i], ref_linear)
        _assert_close(f"linear row {i}", fused.linear_step(q32[:, i], k32[:, i], v32[:, i], kv, k_sum), exact)
        exact, ref_delta = reference.deltanet_step(q[:, i], k[:, i], v[:, i], ref_delta, beta[:, i])
        _assert_close(f"deltanet row {i}", fused.deltanet_step(q32[:, i], k32[:, i], v32[:, i], state, beta[:, i].float().to(DEVICE)), exact)
    _assert_close("kv", kv, ref_linear.kv)
    _assert_close("deltanet state", state, ref_delta)


def test_refuses_states_that_are_not_float32():
    q = torch.randn(1, 2, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        fused.deltanet_step(q, k, v, torch.zeros(1, 1, 16, 16, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        fused.linear_step(torch.randn(1, 3, 16, device=DEVICE), torch.randn(1, 2, 16, device=DEVICE), torch.randn(1, 2, 16, device=DEVICE),
                          torch.zeros(1, 2, 16, 16, device=DEVICE), torch.zeros(1, 2, 16, device=DEVICE))
