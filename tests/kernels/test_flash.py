"""The Triton flash-attention kernels (kernels/flash*.py) against kernels/reference.py.

On CPU they run under TRITON_INTERPRET=1 at small sizes (tests/conftest.py); blocks there are
32 queries x 16 keys (forward, dq) and 16 x 32 (dk/dv), so T up to ~100 crosses many tile
edges. Tolerance (FlashAttention's rule): the kernel's error against a float64 reference is at
most 2x plain torch's error in the same low precision; fp32 inputs get a tight bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbench.tolerance import error_bound, relative_bound
from attnbench.kernels import flash_bwd, flash_dkdv_hopper, flash_fwd, flash_fwd_hopper, flash_launch, reference
from attnbench.kernels import flash
from attnbench.kernels.flash import flash_attention, flash_attention_packed, flash_problem
from attnbench.kernels.flash_dkdv_hopper import hopper_dkdv_route
from attnbench.kernels.flash_fwd_hopper import hopper_route
from attnbench.kernels.flash_tiles import key_blocks, query_blocks
from attnbench.models.softmax import torch_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOLERANCE = 2e-5  # relative to the largest reference value; fp32 kernels land near 1e-6


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write fails the test."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(flash_fwd, "empty", poisoned)
    monkeypatch.setattr(flash_bwd, "empty", poisoned)
    monkeypatch.setattr(flash, "empty", poisoned)


@dataclass
class Case:
    """One attention problem: q [B, T, Hq, D], k/v [B, S, Hkv, D] plus kernel options."""

    batch: int = 2
    t: int = 45
    s: int | None = None
    heads: int = 2
    kv_heads: int | None = None
    head_dim: int = 32
    dtype: torch.dtype = torch.bfloat16
    fused_qkv: bool = False  # q, k, v as strided views of one [B, T, Hq + 2 Hkv, D] projection
    options: dict = field(default_factory=dict)

    def inputs(self, generator: torch.Generator):
        s = self.t if self.s is None else self.s
        hkv = self.heads if self.kv_heads is None else self.kv_heads

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float32).to(DEVICE, self.dtype)

        if self.fused_qkv:
            qkv = randn(self.batch, self.t, self.heads + 2 * hkv, self.head_dim)
            q, k, v = qkv.split([self.heads, hkv, hkv], dim=2)
        else:
            q = randn(self.batch, self.t, self.heads, self.head_dim)
            k, v = randn(self.batch, s, hkv, self.head_dim), randn(self.batch, s, hkv, self.head_dim)
        do = randn(self.batch, self.t, self.heads, self.head_dim)
        return q, k, v, do


def _output_and_grads(fn, q, k, v, do, options):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **options)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _options_in(options: dict, dtype: torch.dtype) -> dict:
    """Tensor options (ALiBi slopes) in the reference's precision; seq_lens stay integers."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in options.items()}


def assert_matches_reference(case: Case, seed: int = 0) -> None:
    """Forward output and dq, dk, dv of the kernel against float64, with the same upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, do = case.inputs(generator)
    options = case.options
    ours = _output_and_grads(flash_attention, q, k, v, do, options)
    exact = _output_and_grads(
        torch_reference, *(x.double() for x in (q, k, v, do)), _options_in(options, torch.float64)
    )
    plain = _output_and_grads(torch_reference, q, k, v, do, options) if case.dtype != torch.float32 else None
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        assert ours[i].shape == exact[i].shape and ours[i].dtype == case.dtype, f"{name}: shape/dtype"
        assert torch.isfinite(ours[i]).all(), f"{name}: non-finite (unwritten or NaN) elements"
        error = (ours[i].double() - exact[i]).abs().max().item()
        magnitude = exact[i].abs().max().item()
        if plain is None:
            bound = relative_bound(FP32_TOLERANCE, magnitude)
        else:  # 2x torch's own rounding error (plus half an ulp at the largest value), as `attnbench check`
            bound = error_bound((plain[i].double() - exact[i]).abs().max().item(), magnitude, case.dtype)
        assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g} ({case})"


def _slopes(heads: int) -> torch.Tensor:
    return reference.alibi_slopes(heads).to(DEVICE)


def _lens(*lengths: int) -> torch.Tensor:
    return torch.tensor(lengths, device=DEVICE)


CASES = {
    "dense-fp16": Case(dtype=torch.float16),
    "causal": Case(options={"causal": True}),
    "causal-T-not-multiple-of-block": Case(t=83, heads=1, options={"causal": True}),
    "T=1": Case(t=1, options={"causal": True}),
    "T=1-decode-S=37": Case(t=1, s=37, options={"causal": True}),
    "cross-T<S-bidirectional": Case(t=20, s=51),
    "cross-T>S-causal-some-rows-see-nothing": Case(t=40, s=23, options={"causal": True}),
    "padding": Case(options={"seq_lens": _lens(45, 17)}),
    "padding-causal-empty-sequence": Case(options={"causal": True, "seq_lens": _lens(0, 30)}),
    "gqa-4:2-causal": Case(heads=4, kv_heads=2, options={"causal": True}),
    "mqa-3:1": Case(heads=3, kv_heads=1),
    "window-bidirectional": Case(t=70, heads=1, options={"window": (9, 4)}),
    "window-causal": Case(t=70, heads=1, options={"causal": True, "window": (13, 0)}),
    "alibi-causal": Case(heads=4, options={"causal": True, "slopes": _slopes(4)}),
    "alibi-window": Case(t=60, heads=2, options={"window": (7, 7), "slopes": _slopes(2)}),
    "window-rope-gqa-causal": Case(t=70, heads=4, kv_heads=2, options={"causal": True, "window": (13, 0), "theta": 1e4}),
    "window-rope-gqa-bidirectional": Case(t=70, heads=4, kv_heads=2, options={"window": (9, 4), "theta": 500.0}),
    "window-alibi-gqa-causal": Case(t=70, heads=4, kv_heads=2, options={"causal": True, "window": (13, 0), "slopes": _slopes(4)}),
    "window-alibi-mqa-bidirectional": Case(t=70, heads=4, kv_heads=1, options={"window": (9, 4), "slopes": _slopes(4)}),
    "rope": Case(options={"theta": 10000.0}),
    "rope-causal-offset-cross": Case(t=20, s=45, options={"causal": True, "theta": 500.0, "offset": 9}),
    "rope-T>S-queries-at-negative-positions": Case(t=40, s=23, options={"theta": 1e4, "offset": 2}),
    "rope-D80-gqa-padding": Case(heads=4, kv_heads=2, head_dim=80, options={"theta": 10000.0, "seq_lens": _lens(31, 45)}),
    "D16": Case(head_dim=16, options={"causal": True, "theta": 10000.0}),
    "D80-fp16": Case(head_dim=80, dtype=torch.float16, options={"causal": True}),
    "fused-qkv-strided-views": Case(heads=4, kv_heads=2, fused_qkv=True, options={"causal": True, "theta": 10000.0}),
    "fused-qkv-no-rope": Case(heads=4, kv_heads=2, fused_qkv=True, options={"causal": True, "window": (20, 0)}),
    "everything": Case(
        t=64, heads=4, kv_heads=2, fused_qkv=True,
        options={"causal": True, "seq_lens": _lens(50, 64), "window": (20, 0), "slopes": _slopes(4), "theta": 1e4, "offset": 3},
    ),
    "fp32-causal-gqa": Case(dtype=torch.float32, heads=4, kv_heads=2, options={"causal": True}),
    "fp32-rope-alibi-padding": Case(dtype=torch.float32, heads=2, options={"slopes": _slopes(2), "theta": 1e4, "seq_lens": _lens(30, 45)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    assert_matches_reference(CASES[name])


def assert_packed_matches_split_views(case: Case) -> None:
    """flash_attention_packed: o and qkv's one-piece gradient equal, bit for bit, flash_attention's
    o and its dq, dk, dv concatenated."""
    q, k, v, do = case.inputs(torch.Generator().manual_seed(0))
    qkv = torch.cat((q, k, v), dim=2).requires_grad_()
    o = flash_attention_packed(qkv, case.heads, **case.options)
    (dqkv,) = torch.autograd.grad(o, qkv, do)
    expected = _output_and_grads(flash_attention, q, k, v, do, case.options)
    assert torch.equal(o, expected[0])
    assert torch.equal(dqkv, torch.cat(expected[1:], dim=2))


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.fused_qkv])
def test_packed_projection_gives_the_split_views_results(name):
    assert_packed_matches_split_views(CASES[name])


def test_packed_projection_needs_heads_that_split_it():
    qkv = torch.zeros(1, 4, 7, 16, device=DEVICE)
    with pytest.raises(ValueError, match="Hq \\+ 2 Hkv"):
        flash_attention_packed(qkv, 4)
    with pytest.raises(ValueError, match="Hq \\+ 2 Hkv"):
        flash_attention_packed(qkv, 7)


# the cases whose loops read tiles through TMA descriptors on a Hopper GPU (16-bit): padding,
# windows and tails read past a descriptor's rows, and D80 past its columns
TMA_CASES = [name for name, case in CASES.items() if case.dtype != torch.float32]


@pytest.fixture
def tma(monkeypatch):
    """use_tma answers for the device as it would for a Hopper GPU (on CPU: the interpreter's
    descriptors); yields its answers, launch by launch."""
    monkeypatch.setattr(flash_launch, "_has_tma", lambda device: True)
    answers = []

    def recorded(*args):
        answers.append(flash_launch.use_tma(*args))
        return answers[-1]

    for module in (flash_fwd, flash_bwd):
        monkeypatch.setattr(module, "use_tma", recorded)
    return answers


@pytest.mark.parametrize("name", TMA_CASES)
def test_tma_loads_match_reference(name, tma):
    assert_matches_reference(CASES[name])
    assert tma and all(tma), "every launch read its tiles through descriptors"


def test_tma_only_where_a_descriptor_can_read_the_tiles(tma):
    x = torch.randn(2, 40, 3, 32, device=DEVICE, dtype=torch.bfloat16)
    plain = flash_problem(x, x)
    assert flash_launch.use_tma(plain, x, x)
    assert flash_launch.use_tma(flash_problem(x, x, theta=1e4), x, x), "RoPE: q and k come rotated"
    assert not flash_launch.use_tma(flash_problem(x.float(), x.float()), x.float(), x.float()), "fp32"
    assert not flash_launch.use_tma(plain, x, x[..., ::2]), "column stride 2"
    assert not flash_launch.use_tma(plain, x, x[..., 1:17]), "base off 16 bytes"
    odd = torch.randn(2, 40, 3, 36, device=DEVICE, dtype=torch.bfloat16)[..., :32]
    assert not flash_launch.use_tma(plain, x, odd), "row stride of 72 bytes"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flash_launch, "TMA_LOADS", False)
        assert not flash_launch.use_tma(plain, x, x), "switched off"


def test_problems_without_tensor_options_are_built_once():
    x = torch.randn(2, 40, 3, 32, device=DEVICE, dtype=torch.bfloat16)
    assert flash_problem(x, x, causal=True, window=[8, 0]) is flash_problem(x.clone(), x, causal=True, window=(8, 0))
    assert flash_problem(x, x, causal=True) is not flash_problem(x, x, causal=False)
    assert flash_problem(x, x) is not flash_problem(x[:, :20], x)
    padded = flash_problem(x, x, seq_lens=_lens(40, 20))
    assert padded.seq_lens.tolist() == [40, 20] and flash_problem(x, x, seq_lens=_lens(3, 4)).seq_lens.tolist() == [3, 4]


def test_custom_scale_matches_reference():
    q, k, v, do = Case(dtype=torch.float32, options={"causal": True}).inputs(torch.Generator().manual_seed(2))
    ours = _output_and_grads(flash_attention, q, k, v, do, {"causal": True, "scale": 0.3})
    exact = _output_and_grads(reference.attention, *(x.double() for x in (q, k, v, do)), {"causal": True, "scale": 0.3})
    for name, mine, truth in zip(("o", "dq", "dk", "dv"), ours, exact):
        assert (mine.double() - truth).abs().max().item() <= relative_bound(FP32_TOLERANCE, truth.abs().max().item()), name


def test_query_without_visible_keys_gets_zero_output_and_zero_gradients():
    case = Case(heads=2, kv_heads=1, options={"causal": True, "seq_lens": _lens(0, 45)})
    q, k, v, do = case.inputs(torch.Generator().manual_seed(1))
    o, dq, dk, dv = _output_and_grads(flash_attention, q, k, v, do, case.options)
    assert (o[0] == 0).all(), "o of a sequence with no visible keys"
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all(), "grads of a sequence with no visible keys"
    assert torch.isfinite(o[1]).all() and (o[1] != 0).any(), "the other sequence is computed"


@settings(max_examples=6, deadline=None, derandomize=True)  # the same draws in every CI run
@given(
    t=st.integers(1, 70),
    extra_keys=st.integers(0, 20),
    group=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    head_dim=st.sampled_from([16, 32, 48]),
    causal=st.booleans(),
    window=st.none() | st.tuples(st.integers(0, 40), st.integers(0, 40)),
    alibi=st.booleans(),
    rope=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_options(t, extra_keys, group, head_dim, causal, window, alibi, rope, padded, seed):
    heads, kv_heads = group
    s = t + extra_keys
    options = {"causal": causal, "window": window}
    if alibi:
        options["slopes"] = _slopes(heads)
    if rope:
        options["theta"] = 10000.0
    if padded:
        options["seq_lens"] = torch.randint(0, s + 1, (2,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    case = Case(t=t, s=s, heads=heads, kv_heads=kv_heads, head_dim=head_dim, options=options)
    assert_matches_reference(case, seed=seed)


@pytest.mark.xfail(strict=True, reason="known: at T=1, S=2 in bf16 under the CPU interpreter, o, dk and dv come out "
                   "about 1% small (dk 0.007 > bound 0.0043); the same case in fp16 is within 1x torch's error, and "
                   "`attnbench check` passes bf16 at real sizes on the H100, so the suspect is the interpreter's bf16 "
                   "handling, not the kernel (found by hypothesis; not yet pinned down)")
def test_two_keys_one_query_bf16_dk_precision():
    assert_matches_reference(Case(batch=2, t=1, s=2, heads=1, head_dim=32), seed=0)


@triton.jit
def _block_ranges_kernel(OUT, start, T, S, kv_len, left, right, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if KEYS:
        lo, full_lo, full_hi, hi = key_blocks(start, T, S, kv_len, left, right, BLOCK_M, BLOCK_N)
    else:
        lo, full_lo, full_hi, hi = query_blocks(start, T, S, kv_len, left, right, BLOCK_M, BLOCK_N)
    tl.store(OUT + 0, lo)
    tl.store(OUT + 1, full_lo)
    tl.store(OUT + 2, full_hi)
    tl.store(OUT + 3, hi)


def _visible_block(t, s, kv_len, left, right, rows, keys) -> torch.Tensor:
    pos_q = torch.tensor(rows)[:, None] + s - t
    pos_k = torch.tensor(keys)[None, :]
    return (pos_k >= pos_q - left) & (pos_k <= pos_q + right) & (pos_k < kv_len)


@pytest.mark.parametrize("t, s, kv_len, left, right", [(70, 70, 70, 1 << 30, 0), (70, 70, 51, 9, 4), (30, 77, 77, 13, 0), (80, 40, 33, 1 << 30, 1 << 30)])
def test_block_ranges_cover_exactly_the_visible_tiles(t, s, kv_len, left, right):
    """Tiles outside [lo, hi) hold no visible pair (so a window skips them: O(T * w) work);
    tiles in [full_lo, full_hi) are visible everywhere (safe to skip the mask)."""
    block_m, block_n = 32, 16
    out = torch.empty(4, dtype=torch.int32, device=DEVICE)
    for keys_of_query_block in (True, False):
        outer, inner = (block_m, block_n) if keys_of_query_block else (block_n, block_m)
        outer_len, inner_len = (t, s) if keys_of_query_block else (s, t)
        for start in range(0, outer_len, outer):
            _block_ranges_kernel[(1,)](out, start, t, s, kv_len, left, right, keys_of_query_block, block_m, block_n)
            lo, full_lo, full_hi, hi = out.tolist()
            assert 0 <= lo <= full_lo <= full_hi <= hi <= inner_len, (start, out.tolist())
            outer_idx = list(range(start, min(start + outer, outer_len)))
            for inner_start in range(0, inner_len, inner):
                inner_idx = list(range(inner_start, min(inner_start + inner, inner_len)))
                rows, keys = (outer_idx, inner_idx) if keys_of_query_block else (inner_idx, outer_idx)
                visible = _visible_block(t, s, kv_len, left, right, rows, keys)
                if not lo <= inner_start < hi:
                    assert not visible.any(), f"skipped tile {inner_start} of block {start} has visible pairs"
                if full_lo <= inner_start < full_hi:
                    assert visible.all(), f"unmasked tile {inner_start} of block {start}"
                    # keys past S may never go unmasked; query rows past T may (q, dO, lse, delta read 0 there)
                    assert not keys_of_query_block or len(inner_idx) == inner, f"partial key tile {inner_start} unmasked"


def test_bad_inputs_raise_value_error():
    q = torch.zeros(1, 4, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        flash_attention(q, torch.zeros(1, 4, 3, 16, device=DEVICE), torch.zeros(1, 4, 3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="even head_dim"):
        odd = torch.zeros(1, 4, 2, 15, device=DEVICE)
        flash_attention(odd, odd, odd, theta=10000.0)
    with pytest.raises(ValueError, match="head_dim 320"):
        wide = torch.zeros(1, 4, 1, 320, device=DEVICE)
        flash_attention(wide, wide, wide)
    with pytest.raises(ValueError, match="seq_lens"):
        flash_attention(q, q, q, seq_lens=torch.tensor([1, 2], device=DEVICE))
    for scale in (0.0, -0.125, float("nan")):
        with pytest.raises(ValueError, match="softmax scale must be > 0"):
            flash_attention(q, q, q, scale=scale)


REAL_SIZE_CASES = {
    "bf16-D128-causal-4k": Case(batch=2, t=4096, heads=4, head_dim=128, options={"causal": True}),
    "bf16-D64-bidirectional-padding-2k": Case(batch=2, t=2048, heads=8, head_dim=64, options={"seq_lens": _lens(2048, 1500)}),
    "fp16-D96-gqa-rope-alibi-causal": Case(batch=1, t=3000, heads=8, kv_heads=2, head_dim=96, dtype=torch.float16, options={"causal": True, "theta": 1e4, "slopes": _slopes(8)}),
    "bf16-D256-window-4k": Case(batch=1, t=4096, heads=2, head_dim=256, options={"causal": True, "window": (512, 0)}),
    "bf16-D128-fused-qkv-mqa": Case(batch=2, t=1023, heads=8, kv_heads=1, head_dim=128, fused_qkv=True, options={"causal": True}),
    "bf16-D64-fused-qkv-gpt-small-4k": Case(batch=4, t=4096, heads=8, head_dim=64, fused_qkv=True, options={"causal": True}),
    "bf16-D64-fused-qkv-rope-gqa-2k": Case(batch=2, t=2048, heads=8, kv_heads=4, head_dim=64, fused_qkv=True, options={"causal": True, "theta": 1e4}),
    # the warp-specialised forward's (flash_fwd_hopper) options, at lengths that end mid-tile
    # (and odd numbers of query blocks, 5 at D 64 causal's 192 rows and D 128's 128, which paired schedules group in twos)
    "hopper-bf16-D64-causal-950": Case(batch=2, t=950, heads=4, head_dim=64, options={"causal": True}),
    "hopper-bf16-D128-gqa-bidirectional-2k": Case(batch=2, t=2048, heads=8, kv_heads=2, head_dim=128),
    "hopper-fp16-D128-causal-cross": Case(batch=2, t=600, s=1500, heads=4, head_dim=128, dtype=torch.float16, options={"causal": True}),
    "hopper-fp16-D64-rope-mqa-cross": Case(batch=1, t=513, s=2000, heads=4, kv_heads=1, head_dim=64, dtype=torch.float16, options={"theta": 1e4}),
    # more work items than SMs: persistent programs walk several, causal ones of different lengths
    "hopper-bf16-D64-gqa-causal-4k": Case(batch=4, t=4096, heads=8, kv_heads=2, head_dim=64, options={"causal": True}),
    "hopper-fp16-D128-bidirectional-3000": Case(batch=4, t=3000, heads=8, head_dim=128, dtype=torch.float16),
}


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(REAL_SIZE_CASES))
def test_matches_reference_at_real_sizes(name, monkeypatch):
    # hopper-* cases take the Hopper forward at every head dim and length, the others the portable kernel
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.EVERYWHERE if name.startswith("hopper-") else flash_fwd_hopper.NOWHERE)
    assert_matches_reference(REAL_SIZE_CASES[name])


@pytest.mark.cuda
@pytest.mark.parametrize(
    "pingpong, persistent, head_by_head, paired",
    [(False, None, True, None), (True, True, True, False), (True, False, True, False), (True, False, False, False),
     (True, True, False, False), (True, True, True, True), (True, False, True, True), (True, True, False, True)],
    ids=["without-turns", "persistent", "per-item", "blocks-first", "persistent-blocks-first", "persistent-pairs", "pairs",
         "persistent-pairs-blocks-first"],
)
@pytest.mark.parametrize("name", [name for name in REAL_SIZE_CASES if name.startswith("hopper-")])
def test_the_hopper_forwards_other_schedules_match_too(name, pingpong, persistent, head_by_head, paired, monkeypatch):
    """Its consumers issuing their wgmma as soon as ready (PINGPONG off), one program per SM walking
    work groups or one per group at every head dim and mask (persistent, None: each plan's), groups of two
    query blocks or one (paired), items block by block across every head (HEAD_BY_HEAD off): each schedule
    the plans do not take."""
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.plans(0, persistent=persistent, paired=paired))
    monkeypatch.setattr(flash_fwd_hopper, "PINGPONG", pingpong)
    monkeypatch.setattr(flash_fwd_hopper, "HEAD_BY_HEAD", head_by_head)
    assert_matches_reference(REAL_SIZE_CASES[name])


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim, candidate", [(d, i) for d, tiles in flash_fwd_hopper.TILES.items() for i in range(len(tiles))])
def test_the_hopper_forwards_tiles_match_at_either_mask(head_dim, candidate, causal, monkeypatch):
    """Every tile tile_sweep times, at both masks (a plan takes each tile at one), on the first hopper case of its head dim."""
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.plans(0, tile=flash_fwd_hopper.TILES[head_dim][candidate]))
    case = next(case for name, case in REAL_SIZE_CASES.items() if name.startswith("hopper-") and case.head_dim == head_dim)
    assert_matches_reference(replace(case, options={**case.options, "causal": causal}))


@pytest.mark.cuda
@pytest.mark.parametrize("tile", flash_dkdv_hopper.TILES, ids=lambda tile: f"{tile.keys}-keys-{tile.stages}-stages{'-pipelined' * tile.pipelined}")
@pytest.mark.parametrize("name", [name for name in REAL_SIZE_CASES if name.startswith("hopper-")])
def test_the_hopper_dkdv_matches_at_real_sizes(name, tile, monkeypatch):
    """The Gluon dk/dv kernel switched on (kernels/flash_dkdv_hopper.py) under each of its tiles (one or two
    warpgroups, pipelined or not) on each hopper case, which it takes (RoPE's stays portable)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.EVERYWHERE)
    monkeypatch.setattr(flash_dkdv_hopper, "HOPPER_DKDV", True)
    case = REAL_SIZE_CASES[name]
    monkeypatch.setitem(flash_dkdv_hopper.TILE, case.head_dim, tile)
    q, k, v, do = case.inputs(torch.Generator().manual_seed(0))
    reason = hopper_dkdv_route(flash_problem(q, k, **case.options), q, k, v, do, torch.empty_like(k), torch.empty_like(v))
    if "theta" in case.options:
        assert reason is not None and "RoPE" in reason
        pytest.skip("RoPE stays on the portable dk/dv kernel")
    assert reason is None, reason
    assert_matches_reference(case)


@pytest.mark.cuda
@pytest.mark.parametrize("name", [name for name in REAL_SIZE_CASES if name.startswith("hopper-")])
def test_the_hopper_cases_take_the_hopper_forward(name, monkeypatch):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.EVERYWHERE)
    case = REAL_SIZE_CASES[name]
    q, k, v, _ = case.inputs(torch.Generator().manual_seed(0))
    assert hopper_route(flash_problem(q, k, **case.options), q, k, v) is None


@pytest.mark.cuda
@pytest.mark.parametrize("name", [name for name, case in REAL_SIZE_CASES.items() if case.fused_qkv])
def test_packed_projection_gives_the_split_views_results_at_real_sizes(name):
    assert_packed_matches_split_views(REAL_SIZE_CASES[name])
