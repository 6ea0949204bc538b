"""Packed variable-length flash attention (kernels/flash.py, flash_attention_varlen): each packed
sequence's output and dq, dk, dv equal its own attention, kernels/reference.py's by definition on
that sequence alone, with bench/tolerance.py's rule.

Under TRITON_INTERPRET=1 the kernels' tiles are 32 queries x 16 keys (forward, dq) and 16 x 32
(dk/dv), so lengths such as 1, 17, 40, 5 start and end sequences inside tiles of the pack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter

from attnbench.kernels import flash, flash_bwd, flash_fwd, flash_launch, flash_rope, reference
from attnbench.kernels.flash import flash_attention_varlen
from attnbench.tolerance import error_bound, relative_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOLERANCE = 2e-5  # as tests/kernels/test_flash.py's


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so a row of the pack no program writes fails the test."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (flash_fwd, flash_bwd, flash_rope, flash):
        monkeypatch.setattr(module, "empty", poisoned)


@pytest.fixture(autouse=True)
def interpreter_rounds_bf16_to_nearest(monkeypatch):
    """Under TRITON_INTERPRET, triton 3.9 casts float32 to bfloat16 by truncation (its
    _convert_float with no rounding mode), where a GPU rounds to nearest even: p, dS and every
    stored bf16 result came out up to one ulp toward zero, up to 2.5x torch's bf16 error on short
    sequences. The interpreter's cast rounds as the GPU does (torch's own conversion) here."""
    truncating = interpreter.InterpreterBuilder.cast_impl

    def rounding(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.uint16).numpy()
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return truncating(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", rounding)


def _offsets(lengths) -> torch.Tensor:
    """cu_seqlens int32 [N + 1] of sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@dataclass
class Pack:
    """Sequences of ``lengths`` packed end to end: q [total, Hq, D], k/v [total, Hkv, D] plus options."""

    lengths: tuple[int, ...] = (1, 17, 40, 5)
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    dtype: torch.dtype = torch.bfloat16
    options: dict = field(default_factory=dict)

    def inputs(self, generator: torch.Generator):
        total = sum(self.lengths)

        def randn(heads):
            return torch.randn(total, heads, self.head_dim, generator=generator).to(DEVICE, self.dtype)

        return randn(self.heads), randn(self.kv_heads), randn(self.kv_heads), randn(self.heads)


def _output_and_grads(fn, q, k, v, do, options):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **options)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _each_sequence(lengths):
    """reference.attention run on every sequence of the pack alone ([1, L, H, D] slices, RoPE at
    positions 0 .. L - 1), concatenated back into the pack's rows: the definition of packed attention."""
    offsets = _offsets(lengths).tolist()

    def one(q, k, v, theta=None, **options):
        if theta is not None:
            q, k = reference.rope(q, theta), reference.rope(k, theta)
        return reference.attention(q, k, v, **options)[0]

    def attention(q, k, v, **options):
        return torch.cat([one(q[None, a:b], k[None, a:b], v[None, a:b], **options) for a, b in zip(offsets, offsets[1:]) if b > a])

    return attention


def assert_matches_each_sequence(pack: Pack, seed: int = 0) -> None:
    """o, dq, dk, dv of the pack against float64 per-sequence attention, with the same upstream gradient."""
    q, k, v, do = pack.inputs(torch.Generator().manual_seed(seed))
    cu_seqlens, longest = _offsets(pack.lengths), max(max(pack.lengths), 1)
    ours = _output_and_grads(lambda q, k, v, **o: flash_attention_varlen(q, k, v, cu_seqlens, longest, **o), q, k, v, do, pack.options)
    per_sequence = _each_sequence(pack.lengths)
    exact_options = {name: x.double() if isinstance(x, torch.Tensor) else x for name, x in pack.options.items()}
    exact = _output_and_grads(per_sequence, *(x.double() for x in (q, k, v, do)), exact_options)
    plain = _output_and_grads(per_sequence, q, k, v, do, pack.options) if pack.dtype != torch.float32 else None
    for i, name in enumerate(("o", "dq", "dk", "dv")):
        assert ours[i].shape == exact[i].shape and ours[i].dtype == pack.dtype, f"{name}: shape/dtype"
        assert torch.isfinite(ours[i]).all(), f"{name}: non-finite (unwritten or NaN) elements"
        error = (ours[i].double() - exact[i]).abs().max().item()
        magnitude = exact[i].abs().max().item()
        if plain is None:
            bound = relative_bound(FP32_TOLERANCE, magnitude)
        else:  # 2x torch's own rounding error plus the rounding floor, as test_flash.py
            bound = error_bound((plain[i].double() - exact[i]).abs().max().item(), magnitude, pack.dtype)
        assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g} ({pack})"


def _slopes(heads: int) -> torch.Tensor:
    return reference.alibi_slopes(heads).to(DEVICE)


PACKS = {
    "causal-gqa-4:2": Pack(options={"causal": True}),
    "bidirectional-gqa-4:2": Pack(),
    "causal-heads-equal-fp16": Pack(heads=2, kv_heads=2, dtype=torch.float16, options={"causal": True}),
    "bidirectional-mqa-D16": Pack(lengths=(33, 2, 31, 16), heads=3, kv_heads=1, head_dim=16),
    "causal-fp32": Pack(dtype=torch.float32, options={"causal": True}),
    "one-sequence": Pack(lengths=(70,), options={"causal": True}),
    "ones-and-an-empty-sequence": Pack(lengths=(1, 1, 0, 1, 48), options={"causal": True}),
    "rope-causal": Pack(lengths=(23, 1, 50, 9), options={"causal": True, "theta": 1e4}),
    "rope-bidirectional-heads-equal": Pack(heads=2, kv_heads=2, options={"theta": 500.0}),
    "alibi-causal": Pack(options={"causal": True, "slopes": _slopes(4)}),
    "alibi-bidirectional-fp32": Pack(dtype=torch.float32, options={"slopes": _slopes(4)}),
    "window-causal": Pack(lengths=(45, 3, 60), options={"causal": True, "window": (13, 0)}),
    "window-bidirectional": Pack(lengths=(45, 3, 60), options={"window": (9, 4)}),
    "everything-fp16": Pack(
        lengths=(37, 17, 1, 52), dtype=torch.float16,
        options={"causal": True, "window": (20, 0), "slopes": _slopes(4), "theta": 1e4, "scale": 0.2},
    ),
}


@pytest.mark.parametrize("name", list(PACKS))
def test_each_packed_sequence_matches_its_own_attention(name):
    assert_matches_each_sequence(PACKS[name])


@pytest.fixture
def tma(monkeypatch):
    """use_tma answers as for a Hopper GPU (on CPU: the interpreter's descriptors); yields its answers."""
    monkeypatch.setattr(flash_launch, "_has_tma", lambda device: True)
    answers = []

    def recorded(*args):
        answers.append(flash_launch.use_tma(*args))
        return answers[-1]

    for module in (flash_fwd, flash_bwd):
        monkeypatch.setattr(module, "use_tma", recorded)
    return answers


@pytest.mark.parametrize("name", [name for name, pack in PACKS.items() if pack.dtype != torch.float32])
def test_tma_loads_stop_at_each_sequence_end(name, tma):
    """Descriptors per sequence (tiles) and per statistics row (lse, delta read from the sequence's
    first row on): a tile never reads the next sequence's rows."""
    assert_matches_each_sequence(PACKS[name])
    assert tma and all(tma), "every launch read its tiles through descriptors"


def test_a_longer_max_seqlen_changes_nothing():
    """max_seqlen only sizes the grid: programs past every sequence's end write nothing."""
    pack = Pack(options={"causal": True})
    q, k, v, do = pack.inputs(torch.Generator().manual_seed(3))
    cu_seqlens = _offsets(pack.lengths)
    exact = _output_and_grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu_seqlens, 40, causal=True), q, k, v, do, {})
    wider = _output_and_grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu_seqlens, 130, causal=True), q, k, v, do, {})
    for name, mine, truth in zip(("o", "dq", "dk", "dv"), wider, exact):
        assert torch.equal(mine, truth), name


def test_compiled_callers_run_it_eagerly():
    """No custom op: torch.compile graph-breaks at flash_attention_varlen, with eager mode's results."""
    pack = Pack(options={"causal": True, "theta": 1e4})
    q, k, v, do = pack.inputs(torch.Generator().manual_seed(4))
    cu_seqlens = _offsets(pack.lengths)

    def layer(q, k, v):
        return flash_attention_varlen(q * 2, k, v, cu_seqlens, 40, causal=True, theta=1e4) + 1

    compiled = torch.compile(layer, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    for name, mine, eager in zip(("o", "dq", "dk", "dv"), _output_and_grads(compiled, q, k, v, do, {}), _output_and_grads(layer, q, k, v, do, {})):
        assert torch.equal(mine, eager), name


def _packed(total=10, heads=2, kv_heads=2, head_dim=16):
    return (torch.zeros(total, h, head_dim, device=DEVICE) for h in (heads, kv_heads, kv_heads))


BAD_OFFSETS = {
    "decreasing": ([0, 6, 4, 10], torch.int32, "without decreasing"),
    "not-ending-at-the-pack-length": ([0, 4, 9], torch.int32, "pack's length 10"),
    "not-starting-at-0": ([1, 4, 10], torch.int32, "rise from 0"),
    "int64": ([0, 4, 10], torch.int64, "int32 tensor"),
    "two-dimensional": ([[0, 4, 10]], torch.int32, "int32 tensor"),
    "one-offset-only": ([10], torch.int32, "int32 tensor"),
}


@pytest.mark.parametrize("name", list(BAD_OFFSETS))
def test_bad_offsets_raise_value_error(name):
    offsets, dtype, message = BAD_OFFSETS[name]
    with pytest.raises(ValueError, match=message):
        flash_attention_varlen(*_packed(), torch.tensor(offsets, dtype=dtype, device=DEVICE), 10)


def test_offsets_must_be_a_tensor():
    with pytest.raises(ValueError, match="int32 tensor"):
        flash_attention_varlen(*_packed(), [0, 4, 10], 10)


def test_bad_max_seqlen_and_shapes_raise_value_error():
    q, k, v = _packed()
    cu_seqlens = _offsets((4, 6))
    for max_seqlen in (5, 0, 6.0):
        with pytest.raises(ValueError, match="max_seqlen"):
            flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen)
    with pytest.raises(ValueError, match="packed q"):
        flash_attention_varlen(q[None], k[None], v[None], cu_seqlens, 6)
    with pytest.raises(ValueError, match="packed q"):
        flash_attention_varlen(q, k[:8], v[:8], cu_seqlens, 6)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        flash_attention_varlen(*_packed(heads=2, kv_heads=3), cu_seqlens, 6)
    with pytest.raises(ValueError, match="ALiBi slopes"):
        flash_attention_varlen(q, k, v, cu_seqlens, 6, slopes=_slopes(3))


def test_offsets_changed_in_place_are_checked_again():
    """The check remembers a passed cu_seqlens only while the tensor is unchanged."""
    q, k, v = _packed()
    cu_seqlens = _offsets((4, 6))
    flash_attention_varlen(q, k, v, cu_seqlens, 6)
    cu_seqlens[1] = 11
    with pytest.raises(ValueError, match="without decreasing"):
        flash_attention_varlen(q, k, v, cu_seqlens, 6)


def _uniform_lengths(total: int, low: int, high: int, generator: torch.Generator) -> tuple[int, ...]:
    """Lengths drawn uniformly from [low, high] until they sum to about ``total`` (the last one cut)."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    return tuple(lengths)


REAL_SIZE_PACKS = {
    "bf16-D128-causal-gqa-16k": Pack(heads=8, kv_heads=2, head_dim=128, options={"causal": True}),
    "bf16-D128-rope-alibi-window-16k": Pack(
        heads=8, kv_heads=8, head_dim=128, options={"causal": True, "theta": 1e4, "slopes": _slopes(8), "window": (1024, 0)}
    ),
}


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(REAL_SIZE_PACKS))
def test_each_packed_sequence_matches_its_own_attention_at_real_sizes(name):
    lengths = _uniform_lengths(16384, 256, 4096, torch.Generator().manual_seed(0))
    pack = REAL_SIZE_PACKS[name]
    assert_matches_each_sequence(dataclasses.replace(pack, lengths=lengths))
