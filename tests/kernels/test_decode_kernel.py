"""The split-KV decode kernel (kernels/decode.py) against the plain-torch decode step
(models/decode.py), itself tested against the full causal forward (tests/models/test_decode.py).

On CPU it runs under TRITON_INTERPRET=1 with 16-key tiles, so caches of ~40 tokens cross tile,
page and split edges. Cache rows past each sequence's length (and unowned pages) hold NaN: a
kernel that reads them fails. Tolerance: fp32 relative to the largest value; fp16/bf16 at most
2x plain torch's error in the same precision (attnbench.tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbench.kernels import decode as decode_kernel
from attnbench.kernels.decode import decode_attention, split_count
from attnbench.kernels.reference import alibi_slopes
from attnbench.models.decode import paginate, softmax_step
from attnbench.tolerance import error_bound, relative_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOLERANCE = 2e-5


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Outputs and partial results start as NaN, so an element the kernels forget to write fails."""
    monkeypatch.setattr(decode_kernel, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@dataclass
class Case:
    """q [B, N, Hq, D] against caches of ``capacity`` rows holding ``lengths`` tokens."""

    lengths: tuple[int, ...] = (37, 9)
    new: int = 1
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    capacity: int = 45
    page: int | None = None
    dtype: torch.dtype = torch.float32
    splits: int | None = None
    options: dict = field(default_factory=dict)


def _poisoned(cache: torch.Tensor, lengths: torch.Tensor, page_table: torch.Tensor | None) -> torch.Tensor:
    """The cache with NaN in every row no sequence's first lengths[b] tokens occupy."""
    poisoned = torch.full_like(cache, float("nan"))
    if page_table is None:
        for b, length in enumerate(lengths.tolist()):
            poisoned[b, :length] = cache[b, :length]
    else:
        page = cache.shape[1]
        for b, length in enumerate(lengths.tolist()):
            for j in range(length):
                slot = page_table[b, j // page]
                poisoned[slot, j % page] = cache[slot, j % page]
    return poisoned


def run_case(case: Case, seed: int = 0):
    """(kernel output, float64 reference, plain torch in case.dtype or None for fp32)."""
    generator = torch.Generator().manual_seed(seed)
    b = len(case.lengths)
    lengths = torch.tensor(case.lengths)
    q = torch.randn(b, case.new, case.heads, case.head_dim, generator=generator)
    k = torch.randn(b, case.capacity, case.kv_heads, case.head_dim, generator=generator)
    v = torch.randn(b, case.capacity, case.kv_heads, case.head_dim, generator=generator)
    table = None
    if case.page is not None:
        k, table = paginate(k, lengths, case.page, torch.Generator().manual_seed(seed), spare=2)
        v, _ = paginate(v, lengths, case.page, torch.Generator().manual_seed(seed), spare=2)
    q, k, v = (x.to(case.dtype) for x in (q, k, v))
    options = dict(case.options)
    if options.pop("alibi", False):
        options["slopes"] = alibi_slopes(case.heads)
    ours = decode_attention(
        q.to(DEVICE), _poisoned(k, lengths, table).to(DEVICE), _poisoned(v, lengths, table).to(DEVICE), lengths.to(DEVICE),
        page_table=None if table is None else table.to(DEVICE), splits=case.splits, **options,
    ).cpu()
    exact = softmax_step(q.double(), k.double(), v.double(), lengths, page_table=table, **options)
    plain = None if case.dtype == torch.float32 else softmax_step(q, k, v, lengths, page_table=table, **options)
    return ours, exact, plain


def assert_matches_reference(case: Case) -> None:
    ours, exact, plain = run_case(case)
    assert ours.shape == exact.shape and ours.dtype == case.dtype, "shape/dtype"
    assert torch.isfinite(ours).all(), "non-finite (unwritten, or read past a length) elements"
    error = (ours.double() - exact).abs().max().item()
    magnitude = exact.abs().max().item()
    if plain is None:
        bound = relative_bound(FP32_TOLERANCE, magnitude)
    else:
        bound = error_bound((plain.double() - exact).abs().max().item(), magnitude, case.dtype)
    assert error <= bound, f"max error {error:.3g} > bound {bound:.3g} ({case})"


CASES = {
    "one-split": Case(splits=1),
    "three-splits": Case(splits=3),
    "default-splits": Case(),
    "empty-splits": Case(lengths=(1, 40, 17), splits=4),  # sequence 0 fills one tile of split 0 only
    "length-1-only": Case(lengths=(1,), capacity=8, splits=2),
    "many-splits-combined-in-pieces": Case(lengths=(390, 37), capacity=400, splits=20),  # 20 > BLOCK_S, most empty for 37
    "length-not-a-multiple-of-the-tile": Case(lengths=(33, 45), capacity=45, splits=2),
    "mha": Case(heads=2, kv_heads=2, splits=2),
    "mqa": Case(heads=3, kv_heads=1, splits=2),
    "gqa-8:2": Case(heads=8, kv_heads=2, splits=3),
    "new-4": Case(new=4, lengths=(37, 4), splits=3),
    "rows-in-two-blocks": Case(new=20, heads=4, kv_heads=1, lengths=(40, 25), splits=2),  # 80 rows > 64
    "window": Case(lengths=(45, 12), new=2, splits=3, options={"window": 9}),
    "window-of-0": Case(lengths=(45, 12), splits=2, options={"window": 0}),
    "alibi": Case(heads=8, kv_heads=2, splits=2, options={"alibi": True}),
    "alibi-window": Case(new=3, splits=3, options={"alibi": True, "window": 20}),
    "scale": Case(splits=2, options={"scale": 0.3}),
    "paged-16": Case(lengths=(37, 9, 16), page=16, splits=3),
    "paged-16-one-split": Case(lengths=(37, 1), page=16, splits=1),
    "paged-5-straddling-tiles": Case(lengths=(41, 23), page=5, splits=2, new=2),
    "paged-16-window-alibi-gqa": Case(lengths=(44, 30), new=2, heads=6, kv_heads=2, page=16, splits=3, options={"window": 13, "alibi": True}),
    "rope": Case(splits=2, options={"theta": 10000.0}),
    "rope-paged-gqa-new-3": Case(lengths=(40, 5), new=3, heads=8, kv_heads=2, page=16, splits=3, options={"theta": 500.0}),
    "rope-alibi-window-D80": Case(head_dim=80, new=2, splits=2, options={"theta": 1e4, "alibi": True, "window": 11}),
    "bf16-rope-paged": Case(dtype=torch.bfloat16, page=16, splits=2, options={"theta": 1e4}),
    "D80": Case(head_dim=80, splits=2),
    "bf16": Case(dtype=torch.bfloat16, splits=3),
    "fp16-paged": Case(dtype=torch.float16, page=16, splits=2, lengths=(40, 21)),
    "bf16-alibi-window": Case(dtype=torch.bfloat16, new=2, splits=2, options={"alibi": True, "window": 15}),
    "fp16-D80-mqa": Case(dtype=torch.float16, head_dim=80, heads=4, kv_heads=1, splits=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    assert_matches_reference(CASES[name])


@pytest.mark.parametrize("theta", [None, 1e4])
@pytest.mark.parametrize("page", [None, 16])
def test_window_on_a_rolling_cache(page, theta):
    """Sequences of 70 and 41 tokens through a cache of 32 rows (contiguous, or two pages of 16
    at shuffled places): window 25 + N = 3 fits, and the kernel reads positions modulo 32. With
    RoPE, q is rotated at positions past the rows (its tables once stopped at the rows: NaN)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([70, 41])
    q = torch.randn(2, 3, 4, 32, generator=generator)
    rows = (2, 32) if page is None else (5, 16)  # per sequence, or a pool of pages
    k, v = torch.randn(*rows, 2, 32, generator=generator), torch.randn(*rows, 2, 32, generator=generator)
    table = None if page is None else torch.tensor([[4, 1], [0, 3]], dtype=torch.int32)
    exact = softmax_step(q.double(), k.double(), v.double(), lengths, page_table=table, window=25, theta=theta)
    ours = decode_attention(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE), page_table=None if table is None else table.to(DEVICE), window=25,
        theta=theta, splits=2,
    ).cpu()
    assert (ours.double() - exact).abs().max().item() <= relative_bound(FP32_TOLERANCE, exact.abs().max().item())


def test_strided_views_of_a_fused_projection():
    """q, k, v as views of one [B, T, Hq + 2 Hkv, D] tensor (what a layer's projection gives)."""
    qkv = torch.randn(2, 30, 4 + 2 + 2, 32, device=DEVICE)
    q, k, v = qkv.split([4, 2, 2], dim=2)
    lengths = torch.tensor([30, 11], device=DEVICE)
    ours = decode_attention(q[:, -1:], k, v, lengths, splits=2)
    exact = softmax_step(q[:, -1:].double(), k.double(), v.double(), lengths)
    assert (ours.double() - exact).abs().max().item() <= relative_bound(FP32_TOLERANCE, exact.abs().max().item())


def test_the_check_can_fail():
    """A cache one token longer than the lengths say gives another answer: the comparison sees it."""
    case = Case(splits=2)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 32, generator=generator).to(DEVICE)
    k, v = (torch.randn(2, 45, 2, 32, generator=generator).to(DEVICE) for _ in range(2))
    lengths = torch.tensor(case.lengths, device=DEVICE)
    ours = decode_attention(q, k, v, lengths + 1, splits=2)
    exact = softmax_step(q.double(), k.double(), v.double(), lengths)
    assert (ours.double() - exact).abs().max().item() > relative_bound(FP32_TOLERANCE, exact.abs().max().item())


def test_split_choice_fills_the_gpu():
    """H200 (132 SMs, RESIDENT programs each), Hkv = 8: one split when the batch fills the GPU,
    more as the batch shrinks, never splits shorter than MIN_SPLIT_KEYS."""
    slots = decode_kernel.RESIDENT * 132
    assert split_count(64 * 8, 65536, 132) == 1
    assert split_count(32 * 8, 65536, 132) == 2
    assert split_count(8 * 8, 65536, 132) == 8
    one = split_count(1 * 8, 65536, 132)
    assert 0.85 * slots <= 8 * one <= slots
    most = 1024 // decode_kernel.MIN_SPLIT_KEYS  # capped by the shortest split, the fewest within 85% of the best
    assert 0.85 * most <= split_count(1 * 8, 1024, 132) <= most
    assert split_count(1, 2 * decode_kernel.MIN_SPLIT_KEYS - 1, 132) == 1


def test_refuses_mismatched_inputs():
    q = torch.randn(1, 1, 4, 32, device=DEVICE)
    k = torch.randn(1, 8, 3, 32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q, k, k, torch.tensor([8]))
    with pytest.raises(ValueError, match="share"):
        decode_attention(q, k.half()[:, :, :2], k.half()[:, :, :2], torch.tensor([8]))


@settings(max_examples=8, deadline=None, derandomize=True)  # the same draws in every CI run
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    new=st.integers(1, 5),
    group=st.sampled_from([(1, 1), (2, 1), (4, 2), (6, 3)]),
    head_dim=st.sampled_from([16, 32, 48]),
    page=st.none() | st.sampled_from([1, 5, 16, 32]),
    window=st.none() | st.integers(0, 40),
    alibi=st.booleans(),
    rope=st.booleans(),
    splits=st.none() | st.integers(1, 6),
)
def test_random_shapes_and_options(lengths, new, group, head_dim, page, window, alibi, rope, splits):
    heads, kv_heads = group
    lengths = tuple(max(length, new) for length in lengths)
    options = {"window": window, "alibi": alibi, **({"theta": 1e4} if rope else {})}
    case = Case(lengths=lengths, new=new, heads=heads, kv_heads=kv_heads, head_dim=head_dim, capacity=max(lengths) + 3,
                page=page, splits=splits, options=options)
    assert_matches_reference(case)
