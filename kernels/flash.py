"""Triton flash attention for the exact-softmax family: standard, causal, key padding,
GQA/MQA, sliding windows, ALiBi and RoPE in one skeleton (forward: kernels/flash_fwd.py,
backward: kernels/flash_bwd.py, shared tiles: kernels/flash_tiles.py, launching:
kernels/flash_launch.py, RoPE's rotation passes: kernels/flash_rope.py); the same kernels
visit listed blocks only for kernels/block_sparse.py, and packed variable-length sequences
for flash_attention_varlen. Eager calls run FlashAttention (an autograd.Function); under
torch.compile the same forward and backward are the custom ops attnbench::flash_fwd and
attnbench::flash_bwd (the varlen path has none: a graph break runs it eagerly).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
import triton

from attnbench.kernels.flash_bwd import flash_backward
from attnbench.kernels.flash_fwd import flash_forward
from attnbench.kernels.flash_launch import NO_LIMIT, FlashProblem, empty, stats_row_length
from attnbench.kernels.flash_rope import rope
from attnbench.kernels.flash_tiles import INTERPRET
from attnbench.kernels.reference import rope_angles

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _forward(problem: FlashProblem, split: tuple[int, int, int] | None, inputs: tuple[torch.Tensor, ...]):
    """o [B, T, Hq, D], lse, and the q, k, v the backward reads (q and k rotated with RoPE)."""
    q, k, v = inputs if split is None else inputs[0].split(split, dim=2)
    if problem.rope and split is None:
        q, k = rope(q, problem, k.shape[1] - q.shape[1]), rope(k, problem, 0)
    elif problem.rope:  # q's and k's heads side by side, rotated in one pass (T = S: no shift)
        q, k = rope(inputs[0][:, :, : split[0] + split[1]], problem, 0).split(split[:2], dim=2)
    o, lse = flash_forward(q, k, v, problem)
    return o, lse, q, k, v


class FlashAttention(torch.autograd.Function):
    """Differentiable flash attention over (q, k, v), or over the fused projection
    (qkv [B, T, Hq + 2 Hkv, D],) with ``split`` = (Hq, Hkv, Hkv): then the backward writes dq, dk,
    dv into one tensor, qkv's gradient, where autograd would concatenate three after a split.
    With RoPE, q and k are rotated before the forward (kernels/flash_rope.py) and the backward
    kernels rotate dq and dk back; the rotated q and k are what is saved. The eager path: no
    dispatcher between the caller and the launches (flash_fwd below is the traced one)."""

    @staticmethod
    def forward(ctx, problem: FlashProblem, split: tuple[int, int, int] | None, *inputs):
        o, lse, q, k, v = _forward(problem, split, inputs)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.problem, ctx.split = problem, split
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if ctx.split is None:
            return None, None, *flash_backward(q, k, v, o, lse, do, ctx.problem)
        b, t, _, d = q.shape
        packed = empty((b, t, sum(ctx.split), d), q.dtype, q.device)
        flash_backward(q, k, v, o, lse, do, ctx.problem, grads=packed.split(ctx.split, dim=2))
        return None, None, packed


# The same forward and backward as torch.library custom ops, which torch.compile traces as
# opaque calls (register_fake gives their output shapes, register_autograd their gradient):
# flash_attention calls them while compiling, FlashAttention.apply otherwise, since a custom
# op's dispatch and generated autograd.Function cost host time per call that eager mode would
# pay on top (PERF_NOTES 11). Options travel as the caller gave them; the ops build the
# FlashProblem when they run. sparse_block > 0: block-sparse, with its four lists (block_sparse.py).
_OPTIONS = "Tensor? seq_lens, Tensor? slopes, Tensor? kv_num, Tensor? kv_idx, Tensor? q_num, Tensor? q_idx, " \
    "bool causal, int[]? window, float? theta, int offset, float? scale, int sparse_block"
_LISTS = ("kv_num", "kv_idx", "q_num", "q_idx")
_DEFAULTS = {"causal": False, "seq_lens": None, "window": None, "slopes": None, "theta": None, "offset": 0, "scale": None}


def _op_problem(q, k, seq_lens, slopes, kv_num, kv_idx, q_num, q_idx, causal, window, theta, offset, scale, sparse_block):
    problem = flash_problem(q, k, causal=causal, seq_lens=seq_lens, window=window, slopes=slopes, theta=theta, offset=offset, scale=scale)
    if sparse_block:
        problem = dataclasses.replace(problem, sparse_block=sparse_block, kv_num=kv_num, kv_idx=kv_idx, q_num=q_num, q_idx=q_idx)
    return problem


@torch.library.custom_op("attnbench::flash_fwd", mutates_args=(), schema=f"(Tensor q, Tensor k, Tensor v, {_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor)")
def flash_fwd(q, k, v, *options):
    """o, lse and the rotated q, k that flash_bwd takes (RoPE; 0-element tensors without)."""
    o, lse, q_saved, k_saved, _ = _forward(_op_problem(q, k, *options), None, (q, k, v))
    if q_saved is q:  # an op's outputs may not alias its inputs
        q_saved, k_saved = q.new_empty(0), k.new_empty(0)
    if lse.shape[2] > q.shape[1]:  # no kernel writes the padding past T, and an op's output must be defined
        lse[:, :, q.shape[1] :].zero_()
    return o, lse, q_saved, k_saved


@flash_fwd.register_fake
def _(q, k, v, *options):
    (b, t, hq, d), rope = q.shape, options[8] is not None
    lse = q.new_empty((b, hq, stats_row_length(t)), dtype=torch.float32)
    return q.new_empty(q.shape), lse, q.new_empty(q.shape if rope else 0), k.new_empty(k.shape if rope else 0)


@torch.library.custom_op("attnbench::flash_bwd", mutates_args=(), schema=f"(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor do, {_OPTIONS}) -> (Tensor, Tensor, Tensor)")
def flash_bwd(q, k, v, o, lse, do, *options):
    """dq, dk, dv of flash_fwd's inputs; q and k are flash_fwd's rotated ones with RoPE."""
    return flash_backward(q, k, v, o, lse, do, _op_problem(q, k, *options))


@flash_bwd.register_fake
def _(q, k, v, o, lse, do, *options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_context(ctx, inputs, output):
    q, k, v, *options = inputs
    o, lse, q_rotated, k_rotated = output
    rope = options[8] is not None
    ctx.save_for_backward(q_rotated if rope else q, k_rotated if rope else k, v, o, lse)
    ctx.options = options
    ctx.mark_non_differentiable(lse, q_rotated, k_rotated)


def _fwd_gradient(ctx, do, *_):
    q, k, v, o, lse = ctx.saved_tensors
    return *torch.ops.attnbench.flash_bwd(q, k, v, o, lse, do, *ctx.options), *(None,) * len(ctx.options)


flash_fwd.register_autograd(_fwd_gradient, setup_context=_fwd_context)


def attend(q, k, v, options: dict, *, qkv: torch.Tensor | None = None, lists: dict | None = None, block: int = 0) -> torch.Tensor:
    """o [B, T, Hq, D] of checked inputs q [B, T, Hq, D], k/v [B, S, Hkv, D], or of qkv, the fused
    projection they are views of; options flash_attention's (all seven keys); lists the four block
    lists (kv_num, kv_idx, q_num, q_idx) of blocks of ``block`` (block_sparse.py)."""
    if torch.compiler.is_compiling():
        lists, window = lists or dict.fromkeys(_LISTS), options["window"]
        return torch.ops.attnbench.flash_fwd(
            q, k, v, options["seq_lens"], options["slopes"], *(lists[name] for name in _LISTS), options["causal"],
            None if window is None else list(window), options["theta"], options["offset"], options["scale"], block,
        )[0]
    problem = flash_problem(q, k, **options)
    if block:
        problem = dataclasses.replace(problem, sparse_block=block, **lists)
    if qkv is None:
        return FlashAttention.apply(problem, None, q, k, v)
    return FlashAttention.apply(problem, (q.shape[2], k.shape[2], v.shape[2]), qkv)


@functools.lru_cache(maxsize=16)
def _rope_tables(length: int, head_dim: int, theta: float, offset: int, device: torch.device):
    """cos, sin float32 [length, D/2] at positions offset .. offset+length-1, cached (a model's
    layers share them; the rotation pass and the backward kernels read them by position)."""
    positions = torch.arange(offset, offset + length, device=device)
    cos, sin = rope_angles(positions, head_dim, theta)
    return cos.contiguous(), sin.contiguous()


def check_inputs(q, k, v, seq_lens, window, slopes, theta, scale) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, T, Hq, D] and k, v [B, S, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (b, _, hq, d), (bk, _, hkv, dk) = q.shape, k.shape
    if b != bk or d != dk or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch or head_dim, or Hq is not a multiple of Hkv")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} > {_MAX_HEAD_DIM} is not supported")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    if seq_lens is not None and tuple(seq_lens.shape) != (b,):
        raise ValueError(f"seq_lens must have shape [B] = [{b}], got {tuple(seq_lens.shape)}")
    if window is not None and min(window) < 0:
        raise ValueError(f"window bounds must be >= 0, got {window}")
    if slopes is not None and tuple(slopes.shape) != (hq,):
        raise ValueError(f"ALiBi slopes must have shape [Hq] = [{hq}], got {tuple(slopes.shape)}")
    if theta is not None and d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    if scale is not None and not scale > 0:  # the forward takes each row's max of the unscaled scores
        raise ValueError(f"the softmax scale must be > 0, got {scale}")


def flash_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    offset: int = 0,
    scale: float | None = None,
) -> FlashProblem:
    """What the kernels need beyond q [B, T, Hq, D] and k [B, S, Hkv, D] (options: flash_attention).
    Without tensor options the problem is cached, so a model's repeated calls (the same shapes
    every layer and step) build it, and its launch arguments, once."""
    t, s, d = q.shape[1], k.shape[1], q.shape[3]
    window = None if window is None else tuple(window)
    if seq_lens is None and slopes is None:
        return _cached_problem(t, s, d, q.dtype, q.device, causal, window, theta, offset, scale)
    return _build_problem(t, s, d, q.dtype, q.device, causal, seq_lens, window, slopes, theta, offset, scale)


@functools.lru_cache(maxsize=64)
def _cached_problem(t, s, d, dtype, device, causal, window, theta, offset, scale) -> FlashProblem:
    return _build_problem(t, s, d, dtype, device, causal, None, window, None, theta, offset, scale)


def _build_problem(t, s, d, dtype, device, causal, seq_lens, window, slopes, theta, offset, scale) -> FlashProblem:
    left, right = window if window is not None else (NO_LIMIT, NO_LIMIT)
    if causal:
        right = 0 if window is None else min(right, 0)
    cos = sin = None
    if theta is not None:  # row p of the tables is position offset + p; with T > S the first
        # queries sit at negative p, so the tables start that many rows earlier in memory
        first = min(0, s - t)
        cos, sin = (x[-first:] for x in _rope_tables(s - first, d, float(theta), int(offset) + first, device))
    return FlashProblem(
        causal=causal,
        left=int(left),
        right=int(right),
        seq_lens=None if seq_lens is None else seq_lens.to(device=device, dtype=torch.int32).contiguous(),
        slopes=None if slopes is None else slopes.to(device=device, dtype=torch.float32).contiguous(),
        cos=cos,
        sin=sin,
        scale=d**-0.5 if scale is None else float(scale),
        head_dim=d,
        dtype=dtype,
        seq_bucket=triton.next_power_of_2(max(t, s, 1024)),
    )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention, differentiable in q, k and v: o [B, T, Hq, D] in q's dtype.

    q [B, T, Hq, D], k/v [B, S, Hkv, D], any strides, fp16/bf16/fp32, D <= 256 (any size;
    tiles are padded to a power of two); Hq a multiple of Hkv (GQA/MQA).
    causal: query i sits at position i + S - T (aligned bottom-right) and sees keys j <= it.
    seq_lens int [B]: keys j >= seq_lens[b] are padding. A query with no visible key gets 0.
    window (left, right): keys within [pos - left, pos + right] (with causal, right is 0).
    slopes float32 [Hq]: ALiBi bias -slope * |pos_q - pos_k|.
    theta: RoPE base (rotate-half; one Triton pass rotates q and k, the backward rotates dq, dk back);
        queries at offset + S - T + i, keys at offset + j.
    scale: of q.k, > 0 (default D^-0.5).
    """
    check_inputs(q, k, v, seq_lens, window, slopes, theta, scale)
    options = {"causal": causal, "seq_lens": seq_lens, "window": window, "slopes": slopes, "theta": theta, "offset": offset, "scale": scale}
    return attend(q, k, v, options)


def flash_attention_packed(qkv: torch.Tensor, heads: int, **options) -> torch.Tensor:
    """flash_attention over the fused projection qkv [B, T, Hq + 2 Hkv, D] (q heads first, then
    k's, then v's; Hq = ``heads``): o [B, T, Hq, D]. Its gradient is one tensor, written in place
    by the backward kernels, so a layer saves the concatenation a split's backward would run."""
    kv_heads, odd = divmod(qkv.shape[2] - heads, 2) if qkv.dim() == 4 else (0, 1)
    if odd or kv_heads < 1:
        raise ValueError(f"expected qkv [B, T, Hq + 2 Hkv, D] with Hq = {heads}; got {tuple(qkv.shape)}")
    q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)
    options = {**_DEFAULTS, **options}
    check_inputs(q, k, v, options["seq_lens"], options["window"], options["slopes"], options["theta"], options["scale"])
    return attend(q, k, v, options, qkv=qkv)


# The last cu_seqlens whose values passed _check_offsets: (a weak reference to it, its version
# counter, the pack's length, its longest sequence). Checking reads the offsets to the host, a
# device sync; repeated calls on one unchanged pack (a model's layers, a benchmark's repetitions,
# a CUDA graph's capture after a warm-up) pay it once.
_checked_offsets: tuple | None = None


def _check_offsets(cu_seqlens: torch.Tensor, total: int) -> int:
    """The longest sequence of the pack that cu_seqlens int32 [N + 1] describes (0, l0, l0 + l1,
    ..., total); ValueError unless it is one."""
    global _checked_offsets
    last = _checked_offsets
    if last is not None and last[0]() is cu_seqlens and last[1:3] == (cu_seqlens._version, total):
        return last[3]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        described = f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be an int32 tensor [N + 1] with N >= 1 (0, l0, l0 + l1, ..., total); got {described}")
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or offsets[-1] != total or min(lengths) < 0:
        shown = offsets if len(offsets) <= 8 else [*offsets[:4], "...", *offsets[-3:]]
        raise ValueError(f"cu_seqlens must rise from 0 to the pack's length {total} without decreasing; got {shown}")
    _checked_offsets = (weakref.ref(cu_seqlens), cu_seqlens._version, total, max(lengths))
    return max(lengths)


def check_varlen_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    """The packed layout's own checks (flash_attention_varlen); check_inputs does the rest."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"expected packed q [total, Hq, D] and k, v [total, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    longest = _check_offsets(cu_seqlens, q.shape[0])
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(longest, 1):
        raise ValueError(f"max_seqlen must be an int >= the longest sequence ({longest}) and >= 1; got {max_seqlen!r}")


@torch.compiler.disable  # no custom op: compiled callers graph-break here and run it eagerly
def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """flash_attention over packed sequences (FlashAttention's varlen layout), differentiable in
    q, k and v: o [total, Hq, D] in q's dtype.

    q [total, Hq, D], k/v [total, Hkv, D]: N sequences laid end to end, no padding; sequence n is
    rows cu_seqlens[n] .. cu_seqlens[n + 1] - 1 of q, k and v alike (self-attention: its queries
    see only its own keys). cu_seqlens int32 [N + 1] on q's device: 0, l0, l0 + l1, ..., total
    (empty sequences allowed), checked on the host (one sync, then remembered while that tensor
    is unchanged); max_seqlen: an int >= the longest length (it sizes the grid).
    dtypes, D, GQA and the options as flash_attention's, with positions counted from each
    sequence's first row: causal (query i of a sequence sees its keys j <= i), window (left,
    right), slopes float32 [Hq] (ALiBi), theta (RoPE; positions restart at 0 in each sequence),
    scale.
    """
    check_varlen_inputs(q, k, v, cu_seqlens, max_seqlen)
    q, k, v = q[None], k[None], v[None]  # the pack is one batch row [1, total, H, D]
    check_inputs(q, k, v, None, window, slopes, theta, scale)
    window = None if window is None else tuple(window)
    problem = _build_problem(max_seqlen, max_seqlen, q.shape[3], q.dtype, q.device, causal, None, window, slopes, theta, 0, scale)
    problem = dataclasses.replace(problem, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return FlashAttention.apply(problem, None, q, k, v)[0]
