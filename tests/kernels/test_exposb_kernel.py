"""ExpoSB Triton kernel against the plain-torch reference: output and every gradient
(q, k, v and the seven per-head parameters), causal and bidirectional, key padding, GQA,
T not a multiple of the tile; the reference's own gradients by gradcheck; the RoPE identity.

On CPU the kernel runs under TRITON_INTERPRET=1 with 16 x 16 tiles, so T <= 64 already spans
tiles below, on and above the diagonal."""

import pytest
import torch

from attnbench.kernels import reference
from attnbench.kernels.exposb import PARAM_NAMES, exposb_attention_triton
from attnbench.tolerance import error_bound, relative_bound, rounding_floor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_NAMES = ("q", "k", "v", *PARAM_NAMES)


def random_params(heads: int, head_dim: int, strong_decay: bool = False) -> dict[str, torch.Tensor]:
    """Per-head parameters away from their initial values, so every term of the gradient is live."""
    return {
        "lam": 0.01 + 0.1 * torch.rand(heads),
        "alpha": 0.5 * torch.randn(heads),
        "beta": 1 + 0.2 * torch.randn(heads),
        "gamma": 0.5 * torch.randn(heads),
        "mu": head_dim / 2 + torch.randn(heads),
        "sigma": head_dim / 4 + torch.rand(heads),
        "delta": (0.5 + torch.rand(heads)) if strong_decay else 0.05 * torch.rand(heads),
    }


def output_and_grads(fn, q, k, v, params, upstream, dtype, **options):
    """fn's output and the gradients of (out * upstream).sum() for q, k, v and the parameters,
    with q, k, v cast to ``dtype`` (the parameters stay float32 unless dtype is float64)."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = [x.detach().to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    leaves = {name: value.detach().to(DEVICE, param_dtype).requires_grad_() for name, value in params.items()}
    out = fn(*inputs, **leaves, **options)
    out.backward(upstream.to(DEVICE, dtype))
    grads = [x.grad for x in inputs] + [leaves[name].grad for name in PARAM_NAMES]
    return out.double(), [g.double() for g in grads]


def assert_matches_reference(dtype, b, t, s, hq, hkv, d, causal, seq_lens, strong_decay=False, delta=None):
    """The kernel in ``dtype`` against float64 evaluated at the same ``dtype``-rounded inputs and
    upstream gradient (FlashAttention's method: what is compared is arithmetic, not the
    rounding of the inputs, which for the parameter gradients summed over every score is
    larger than either implementation's arithmetic error and would make the bound noise).
    delta: every head's decay (default: random_params')."""
    q = torch.randn(b, t, hq, d).to(dtype)
    k, v = torch.randn(b, s, hkv, d).to(dtype), torch.randn(b, s, hkv, d).to(dtype)
    params = random_params(hq, d, strong_decay)
    if delta is not None:
        params["delta"] = torch.full((hq,), delta)
    upstream = torch.randn(b, t, hq, d).to(dtype)
    options = dict(causal=causal, seq_lens=None if seq_lens is None else torch.tensor(seq_lens, device=DEVICE))
    exact = output_and_grads(reference.exposb_attention, q, k, v, params, upstream, torch.float64, **options)
    ours = output_and_grads(exposb_attention_triton, q, k, v, params, upstream, dtype, **options)
    plain = None
    if dtype != torch.float32:
        plain = output_and_grads(reference.exposb_attention, q, k, v, params, upstream, dtype, **options)
    # the gradients share the rounding of the score gradient dS = P (dP - delta), at the scale of the
    # case's largest gradient; with one key the exact dS is 0, so q's, k's and the parameters' are 0
    # and what the kernel returns is that rounding, summed over every score
    scale = max(g.abs().max().item() for g in exact[1])
    for i, name in enumerate(("out", *GRAD_NAMES)):
        got, want = (ours[0], exact[0]) if i == 0 else (ours[1][i - 1], exact[1][i - 1])
        err, magnitude = (got - want).abs().max().item(), want.abs().max().item()
        if plain is None:  # fp32: parameter gradients sum ~1e4 fp32 terms; a wrong term shows at >= 1e-2
            bound = relative_bound(1e-4, max(magnitude, 0.1 * scale))  # relative to itself, or to dS's scale
        else:  # low precision: at most twice plain torch's own error in that precision
            torch_got = plain[0] if i == 0 else plain[1][i - 1]
            bound = error_bound((torch_got - want).abs().max().item(), magnitude, dtype)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype}, causal={causal}, seq_lens={seq_lens})"


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("seq_lens", [None, [37, 21]], ids=["full", "padded"])
def test_fp32_gqa_matches_reference(causal, seq_lens):
    torch.manual_seed(0)
    assert_matches_reference(torch.float32, b=2, t=37, s=37, hq=4, hkv=2, d=32, causal=causal, seq_lens=seq_lens)


UNEQUAL_TILES = {
    "wide-queries": {"fwd": (32, 16, 1), "dq": (32, 16, 1), "dkdv": (16, 32, 1)},
    "wide-keys": {"fwd": (16, 32, 1), "dq": (16, 32, 1), "dkdv": (32, 16, 1)},
}


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter tiles")
@pytest.mark.parametrize("tiles", UNEQUAL_TILES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fp32_matches_reference_with_unequal_tiles(tiles, causal, monkeypatch):
    """BLOCK_M != BLOCK_N either way (the GPU's tiles are unequal): the below/diagonal/above
    regimes and the decay's pivot hold for any tile shape, so tuning the tiles is safe."""
    from attnbench.kernels import exposb_launch

    monkeypatch.setattr(exposb_launch, "_INTERPRETER_TILES", UNEQUAL_TILES[tiles])
    assert_matches_reference(torch.float32, 2, 70, 70, 4, 2, 32, causal, [70, 41])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fp32_strong_decay_head_dim_32(causal):
    torch.manual_seed(1)
    assert_matches_reference(torch.float32, b=1, t=64, s=64, hq=2, hkv=2, d=32, causal=causal, seq_lens=None, strong_decay=True)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fp32_key_length_cuts_an_off_diagonal_tile(causal):
    """Off the diagonal only the key tile that kv_len cuts is masked: with 16 x 16 tiles, kv_len 37
    of 64 cuts one below the diagonal of the last query blocks and (bidirectional) one above that of
    the first; 59 one above the first blocks' (the last's is its diagonal)."""
    torch.manual_seed(12)
    assert_matches_reference(torch.float32, b=2, t=64, s=64, hq=2, hkv=1, d=32, causal=causal, seq_lens=[37, 59])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fp32_query_factor_underflow_stays_finite(causal):
    """delta 20: exp(-delta |m - p|) underflows float32 15 positions from a query block's pivot, so
    the query factor rests on its floor (exposb_tiles.owner_factor); without it the masked scores
    of a cut tile (-inf) times 0 are NaN. The output and every gradient must stay finite and match."""
    torch.manual_seed(13)
    assert_matches_reference(torch.float32, b=2, t=64, s=64, hq=2, hkv=1, d=32, causal=causal, seq_lens=[37, 59], delta=20.0)


def test_fp32_fewer_queries_than_keys():
    """Queries are the last T of S positions (bottom-right aligned, as with a KV cache)."""
    torch.manual_seed(2)
    assert_matches_reference(torch.float32, b=2, t=19, s=45, hq=2, hkv=1, d=32, causal=True, seq_lens=[45, 30])


@pytest.mark.parametrize("t,s", [(1, 1), (1, 23)], ids=["T=S=1", "T=1,S=23"])
def test_fp32_single_query(t, s):
    torch.manual_seed(10)
    assert_matches_reference(torch.float32, b=2, t=t, s=s, hq=2, hkv=1, d=32, causal=True, seq_lens=[s, (s + 1) // 2])


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fp16_within_twice_torch_error(causal):
    """bf16 runs on CUDA only (test_cuda_real_sizes): the Triton 3.9 interpreter's tl.dot returns
    garbage for bf16 operands."""
    torch.manual_seed(3)
    assert_matches_reference(torch.float16, b=2, t=40, s=40, hq=4, hkv=2, d=32, causal=causal, seq_lens=[40, 27])


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter descriptors on a pretend Hopper")
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fp16_forward_through_tma_descriptors(causal, monkeypatch):
    """The forward's k', v tiles through tensor descriptors, as on Hopper (the interpreter runs them)."""
    from attnbench.kernels import exposb_launch, flash_launch

    monkeypatch.setattr(flash_launch, "_has_tma", lambda device: True)
    answers = []

    def recorded(*tensors):
        answers.append(flash_launch.tma_tensors(*tensors))
        return answers[-1]

    monkeypatch.setattr(exposb_launch, "tma_tensors", recorded)
    torch.manual_seed(14)
    assert_matches_reference(torch.float16, b=2, t=40, s=40, hq=4, hkv=2, d=32, causal=causal, seq_lens=[40, 27])
    assert answers and all(answers), "every forward read its tiles through descriptors"


def test_query_that_sees_no_key_gets_zeros_and_finite_grads():
    torch.manual_seed(4)
    b, t, h, d = 2, 20, 2, 32
    q, k, v = (torch.randn(b, t, h, d, device=DEVICE, requires_grad=True) for _ in range(3))
    params = {name: value.to(DEVICE).requires_grad_() for name, value in random_params(h, d).items()}
    out = exposb_attention_triton(q, k, v, **params, causal=True, seq_lens=torch.tensor([0, 7], device=DEVICE))
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0])), "batch 0 has no key: its output must be zero"
    assert out[1].abs().sum() > 0
    for name, grad in zip(GRAD_NAMES, [q.grad, k.grad, v.grad, *(params[n].grad for n in PARAM_NAMES)]):
        assert torch.isfinite(grad).all(), f"{name} gradient is not finite"


def test_reference_parameter_gradients_by_gradcheck():
    torch.manual_seed(5)
    b, t, hq, hkv, d = 1, 5, 2, 1, 8
    q = torch.randn(b, t, hq, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, t, hkv, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    params = {name: value.double().requires_grad_() for name, value in random_params(hq, d).items()}
    params["delta"] = params["delta"].detach() + 0.2  # a decay large enough to matter at T = 5
    params["delta"].requires_grad_()

    def fn(q, k, v, *values):
        return reference.exposb_attention(q, k, v, **dict(zip(PARAM_NAMES, values)), causal=True, seq_lens=torch.tensor([4]))

    assert torch.autograd.gradcheck(fn, (q, k, v, *(params[n] for n in PARAM_NAMES)))


def identity_params(heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """alpha = gamma = delta = 0, beta = 1: ExpoSB reduces to RoPE (lam, mu, sigma then do nothing)."""
    ones = torch.ones(heads)
    return dict(lam=0.02 * ones, alpha=0 * ones, beta=ones, gamma=0 * ones, mu=head_dim / 2 * ones, sigma=head_dim / 4 * ones, delta=0 * ones)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_identity_parameters_give_rope(causal):
    torch.manual_seed(6)
    b, t, hq, hkv, d = 2, 29, 4, 2, 32
    q = torch.randn(b, t, hq, d, device=DEVICE)
    k, v = (torch.randn(b, t, hkv, d, device=DEVICE) for _ in range(2))
    seq_lens = torch.tensor([29, 11], device=DEVICE)
    params = {name: value.to(DEVICE) for name, value in identity_params(hq, d).items()}
    rope = reference.attention(reference.rope(q), reference.rope(k), v, causal=causal, seq_lens=seq_lens)
    ref = reference.exposb_attention(q, k, v, **params, causal=causal, seq_lens=seq_lens)
    ours = exposb_attention_triton(q, k, v, **params, causal=causal, seq_lens=seq_lens)
    # same cos/sin tables and factors of exactly 1: only the summation order differs
    assert (ref - rope).abs().max().item() <= 1e-6, "reference ExpoSB with identity parameters is not RoPE"
    assert (ours - rope).abs().max().item() <= 1e-5, "Triton ExpoSB with identity parameters is not RoPE"


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_cuda_identity_matches_rope_triton_kernel(causal):
    from attnbench.kernels.flash import flash_attention

    torch.manual_seed(7)
    b, t, h, d = 2, 1024, 8, 64
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    params = {name: value.cuda() for name, value in identity_params(h, d).items()}
    exact = reference.attention(reference.rope(q.double()), reference.rope(k.double()), v.double(), causal=causal)
    rope = flash_attention(q, k, v, causal=causal, theta=10000.0).double()
    ours = exposb_attention_triton(q, k, v, **params, causal=causal).double()
    bound = 2 * (rope - exact).abs().max().item() + rounding_floor(exact.abs().max().item(), torch.bfloat16)
    assert (ours - exact).abs().max().item() <= bound, "ExpoSB at identity is less accurate than the RoPE kernel"


# Known, not root-caused (H100 and H200): at seed 8, head 4 (d lam = 383) gets d lam to 1.1e-3
# relative error in fp16 against plain torch's 4e-4, so 0.421 > 2 x 0.156; at seeds 0-5 and 9 the
# kernel's worst lam error is 0.14-0.74x torch's, but at both seeds looked at per head (8, 9) its
# error on the largest |d lam| head is ~3x torch's (seed 9: 8.8e-4 against 2.8e-4 relative).
# Moving sm_scale out of the fp16 dX (FlashAttention 2's order) changed nothing (0.421).
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_real_sizes(dtype, causal, d):
    torch.manual_seed(8)
    assert_matches_reference(dtype, b=2, t=1000, s=1000, hq=8, hkv=2, d=d, causal=causal, seq_lens=[1000, 613])


@pytest.mark.cuda
def test_cuda_fp32_matches_reference():
    torch.manual_seed(9)
    assert_matches_reference(torch.float32, b=1, t=777, s=777, hq=4, hkv=4, d=64, causal=True, seq_lens=None, strong_decay=True)
