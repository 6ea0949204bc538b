"""Block-sparse flash attention (kernels/block_sparse.py, masks: kernels/block_mask.py) against kernels/reference.py with the
equivalent token mask: forward output and dq, dk, dv, with bench/tolerance.py's rule.

Under TRITON_INTERPRET=1 mask blocks are 32 tokens and the kernels' tiles 32 x 16 (forward, dq)
and 16 x 32 (dk/dv), so T ~ 80 gives three blocks with a partial last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbench.kernels import flash, flash_bwd, flash_fwd, reference
from attnbench.kernels.block_mask import BlockLists, block_lists, block_pairs, block_sparse_flops, expand_blocks
from attnbench.kernels.block_sparse import block_sparse_attention
from attnbench.kernels.flash import flash_attention
from attnbench.kernels.flash_launch import SPARSE_TILE
from attnbench.kernels.reference import attention, visible
from attnbench.tolerance import error_bound, relative_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOLERANCE = 2e-5
BLOCK = SPARSE_TILE


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write fails the test."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (flash_fwd, flash_bwd, flash):
        monkeypatch.setattr(module, "empty", poisoned)


@dataclass
class Case:
    """q [B, T, Hq, D], k/v [B, S, Hkv, D], a random block mask keeping ``density`` of the blocks
    ([B, mask_heads or Hq, ...]), plus flash options."""

    batch: int = 2
    t: int = 83
    s: int | None = None
    heads: int = 2
    kv_heads: int | None = None
    head_dim: int = 32
    dtype: torch.dtype = torch.bfloat16
    density: float = 0.5
    mask_heads: int | None = None
    options: dict = field(default_factory=lambda: {"causal": True})

    def inputs(self, generator: torch.Generator):
        s = self.t if self.s is None else self.s
        hkv = self.heads if self.kv_heads is None else self.kv_heads

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(DEVICE, self.dtype)

        q, do = randn(self.batch, self.t, self.heads, self.head_dim), randn(self.batch, self.t, self.heads, self.head_dim)
        k, v = randn(self.batch, s, hkv, self.head_dim), randn(self.batch, s, hkv, self.head_dim)
        shape = (self.batch, self.mask_heads or self.heads, -(-self.t // BLOCK), -(-s // BLOCK))
        mask = (torch.rand(shape, generator=generator) < self.density).to(DEVICE)
        return q, k, v, do, mask


def _output_and_grads(fn, q, k, v, do, **options):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **options)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _sparse(q, k, v, do, lists, options):
    return _output_and_grads(block_sparse_attention, q, k, v, do, lists=lists, **options)


def _reference(q, k, v, do, mask, options, dtype=None):
    """reference.attention with the block mask expanded to tokens (in ``dtype``, default the inputs')."""
    cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))
    options = dict(options)
    theta = options.pop("theta", None)

    def rotated_attention(q, k, v, **options):  # RoPE as the kernel applies it (queries at S - T + i)
        if theta is not None:
            q, k = reference.rope(q, theta, k.shape[1] - q.shape[1]), reference.rope(k, theta)
        return attention(q, k, v, **options)

    tokens = expand_blocks(mask, BLOCK, q.shape[1], k.shape[1])
    return _output_and_grads(rotated_attention, *(cast(x) for x in (q, k, v, do)), mask=tokens, **options)


def assert_matches_reference(case: Case, inputs: tuple, lists: BlockLists | None = None) -> None:
    """The kernel with ``lists`` (default: those of the inputs' mask) against float64 with the mask."""
    q, k, v, do, mask = inputs
    ours = _sparse(q, k, v, do, lists or block_lists(mask, BLOCK), case.options)
    exact = _reference(q, k, v, do, mask, case.options, torch.float64)
    plain = _reference(q, k, v, do, mask, case.options) if case.dtype != torch.float32 else None
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        assert ours[i].shape == exact[i].shape and ours[i].dtype == case.dtype, f"{name}: shape/dtype"
        assert torch.isfinite(ours[i]).all(), f"{name}: non-finite (unwritten or NaN) elements"
        error = (ours[i].double() - exact[i]).abs().max().item()
        magnitude = exact[i].abs().max().item()
        if plain is None:
            bound = relative_bound(FP32_TOLERANCE, magnitude)
        else:
            bound = error_bound((plain[i].double() - exact[i]).abs().max().item(), magnitude, case.dtype)
        assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g} ({case})"


def _inputs(case: Case, seed: int = 0) -> tuple:
    return case.inputs(torch.Generator().manual_seed(seed))


CASES = {
    "causal-T-not-multiple-of-block": Case(),
    "causal-fp16-D80": Case(dtype=torch.float16, head_dim=80),
    "fp32-causal": Case(dtype=torch.float32),
    "gqa-4:2": Case(heads=4, kv_heads=2),
    "mqa-3:1-one-mask-for-all-heads": Case(heads=3, kv_heads=1, mask_heads=1),
    "sparse-density-0.25": Case(t=100, density=0.25),
    "cross-T<S-causal": Case(t=40, s=77),
    "cross-T>S-causal-some-rows-see-nothing": Case(t=70, s=45),
    "bidirectional": Case(t=70, s=90, options={}),
    "padding-causal": Case(options={"causal": True, "seq_lens": torch.tensor([83, 40], device=DEVICE)}),
    "rope-causal": Case(options={"causal": True, "theta": 1e4}),
    "T=1": Case(t=1, s=50),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_with_the_same_mask(name):
    assert_matches_reference(CASES[name], _inputs(CASES[name]))


@settings(max_examples=6, deadline=None, derandomize=True)  # the same draws in every CI run
@given(
    t=st.integers(1, 100),
    s=st.integers(1, 100),
    group=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    head_dim=st.sampled_from([16, 48]),
    causal=st.booleans(),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_masks(t, s, group, head_dim, causal, density, seed):
    case = Case(t=t, s=s, heads=group[0], kv_heads=group[1], head_dim=head_dim, density=density, options={"causal": causal})
    assert_matches_reference(case, _inputs(case, seed))


def test_empty_lists_for_some_rows_give_zeros_there():
    case = Case(heads=4, kv_heads=2)
    q, k, v, do, mask = _inputs(case, seed=3)
    mask[0, :, 1] = False  # query block 1 of sequence 0 sees nothing, in every head
    mask[1, 2] = False  # head 2 of sequence 1 sees nothing at all
    mask[1, 3] = True
    o, dq, dk, dv = _sparse(q, k, v, do, block_lists(mask, BLOCK), case.options)
    assert (o[0, BLOCK : 2 * BLOCK] == 0).all() and (dq[0, BLOCK : 2 * BLOCK] == 0).all(), "rows with an empty list"
    assert (o[1, :, 2] == 0).all() and (dq[1, :, 2] == 0).all(), "a head with every list empty"
    assert (o[1, :, 3] != 0).all(), "a head with every list full"
    assert_matches_reference(case, (q, k, v, do, mask))


def test_all_lists_empty_give_zero_output_and_gradients():
    case = Case(density=0.0)
    q, k, v, do, mask = _inputs(case, seed=1)
    for x in _sparse(q, k, v, do, block_lists(mask, BLOCK), case.options):
        assert (x == 0).all()


@pytest.mark.parametrize("options", [{"causal": True}, {}, {"causal": True, "window": (40, 0)}])
def test_full_lists_equal_the_dense_kernel_bit_for_bit(options):
    """Every block listed: the same tiles in the same order as the dense kernel, so the same bits."""
    case = Case(heads=4, kv_heads=2, density=1.0, options=options)
    q, k, v, do, mask = _inputs(case, seed=2)
    dense = _output_and_grads(flash_attention, q, k, v, do, **options)
    for name, mine, theirs in zip(("o", "dq", "dk", "dv"), _sparse(q, k, v, do, block_lists(mask, BLOCK), options), dense):
        assert torch.equal(mine, theirs), name


def test_a_wrong_list_fails_the_check():
    """The check can fail: lists missing one visible block of the mask give another answer."""
    case = Case(t=3 * BLOCK + 4, density=1.0)  # four query blocks at any BLOCK
    inputs = _inputs(case, seed=4)
    wrong = inputs[-1].clone()
    wrong[1, 0, 2, 1] = False  # visible under causal masking
    assert_matches_reference(case, inputs)
    with pytest.raises(AssertionError):
        assert_matches_reference(case, inputs, block_lists(wrong, BLOCK))


def test_lists_hold_the_mask_in_both_directions():
    mask = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    lists = block_lists(mask, BLOCK)
    for num, idx, dense in ((lists.kv_num, lists.kv_idx, mask), (lists.q_num, lists.q_idx, mask.transpose(-1, -2))):
        rebuilt = torch.zeros_like(dense)
        for pos in torch.cartesian_prod(*(torch.arange(n) for n in dense.shape[:3])).tolist():
            listed = idx[tuple(pos)][: num[tuple(pos)]].long()
            assert listed.tolist() == sorted(listed.tolist()), "ascending"
            rebuilt[tuple(pos)][listed] = True
        assert torch.equal(rebuilt, dense)


def test_bad_lists_raise_value_error():
    q = torch.zeros(1, 2 * BLOCK + 6, 2, 16, device=DEVICE)  # three blocks at any BLOCK
    with pytest.raises(ValueError, match="multiple of"):
        block_sparse_attention(q, q, q, block_lists(torch.ones(1, 2, 5, 5, dtype=torch.bool), BLOCK // 2))
    with pytest.raises(ValueError, match="kv_num must have shape"):
        block_sparse_attention(q, q, q, block_lists(torch.ones(1, 2, 2, 3, dtype=torch.bool), BLOCK))
    with pytest.raises(ValueError, match="bool block mask"):
        block_lists(torch.ones(2, 3, 3), BLOCK)


@pytest.mark.parametrize("t, s, causal", [(83, 83, True), (40, 77, True), (70, 45, True), (70, 90, False)])
def test_flops_count_the_visible_pairs_of_the_kept_blocks(t, s, causal):
    mask = torch.rand(2, 3, -(-t // BLOCK), -(-s // BLOCK), generator=torch.Generator().manual_seed(5)) < 0.5
    pairs = (visible(t, s, causal=causal) & expand_blocks(mask, BLOCK, t, s)).sum().item()
    assert block_sparse_flops(mask, t, s, heads=3, head_dim=16, block=BLOCK, causal=causal) == 4 * 16 * pairs
    full = torch.ones(1, 1, *mask.shape[2:], dtype=torch.bool)
    dense_pairs = visible(t, s, causal=causal).sum().item()
    assert block_sparse_flops(full, t, s, heads=6, head_dim=16, block=BLOCK, causal=causal) == 4 * 16 * 6 * dense_pairs
    assert block_pairs(t, s, BLOCK, causal).sum().item() == dense_pairs


@pytest.mark.cuda
@pytest.mark.parametrize("t, heads, kv_heads, head_dim", [(4096, 4, 4, 128), (2000, 8, 2, 64)])
def test_matches_reference_at_real_sizes(t, heads, kv_heads, head_dim):
    case = Case(batch=1, t=t, heads=heads, kv_heads=kv_heads, head_dim=head_dim, density=0.3)
    assert_matches_reference(case, _inputs(case))
