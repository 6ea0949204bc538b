"""Launching the flash kernels from the host: FlashProblem (what a launch needs beyond q, k,
v), output allocation, the hand-chosen tile lists (flash_autotune) and FlashKernel, which
keeps triton's per-launch host work (autotuner key, argument binding) out of the hot path.
The kernels themselves: kernels/flash_fwd.py, kernels/flash_bwd.py; tiles: kernels/flash_tiles.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import triton
from triton import knobs

from attnbench.kernels.flash_tiles import INTERPRET, LEFT_EDGE, LENGTH_EDGE, RIGHT_EDGE

NO_LIMIT = 1 << 30  # "no window" bound: far beyond any sequence, safe from int32 overflow


@dataclass(frozen=True)
class FlashProblem:
    """What the kernels need beyond q, k, v, resolved by kernels/flash.py.

    left/right: visible keys around a query's position (causal: right = 0; no window: huge);
    seq_lens int32 [B] | None; slopes float32 [Hq] | None; cos/sin float32 [S, D/2] | None
    (RoPE angles by key position: q and k are rotated before the kernels, dq and dk rotated back
    in the backward's epilogues, kernels/flash_rope.py);
    scale: softmax scale of q.k;
    cu_seqlens int32 [N + 1] | None: packed sequences (q, k, v [1, total, H, D], sequence n its rows
    cu_seqlens[n] .. cu_seqlens[n + 1] - 1; flash_tiles.sequence), max_seqlen the longest, which
    sizes the grids (programs).
    """

    causal: bool
    left: int
    right: int
    seq_lens: torch.Tensor | None
    slopes: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    scale: float
    head_dim: int
    dtype: torch.dtype
    seq_bucket: int
    sparse_block: int = 0
    kv_num: torch.Tensor | None = None
    kv_idx: torch.Tensor | None = None
    q_num: torch.Tensor | None = None
    q_idx: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    def tensors(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """SEQ_LENS, CU_SEQLENS, SLOPES kernel arguments; absent ones are a never-read placeholder."""
        return tuple(placeholder if x is None else x for x in (self.seq_lens, self.cu_seqlens, self.slopes))

    def pack_offsets(self, placeholder: torch.Tensor) -> torch.Tensor:
        """CU_SEQLENS kernel argument (a placeholder unless packed)."""
        return placeholder if self.cu_seqlens is None else self.cu_seqlens

    def programs(self, batch: int, rows: int) -> tuple[int, int]:
        """(rows, sequences) a grid covers for a launch over ``rows`` rows of ``batch`` batch rows:
        packed, the longest sequence's rows and the sequence count (programs past a shorter
        sequence's end return at once)."""
        if self.cu_seqlens is None:
            return rows, batch
        return self.max_seqlen, self.cu_seqlens.numel() - 1

    def key_lists(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KV_NUM, KV_IDX kernel arguments (placeholders when dense)."""
        return (self.kv_num, self.kv_idx) if self.sparse_block else (placeholder, placeholder)

    def query_lists(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q_NUM, Q_IDX kernel arguments (placeholders when dense)."""
        return (self.q_num, self.q_idx) if self.sparse_block else (placeholder, placeholder)

    def rope_tables(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """COS, SIN kernel arguments (placeholders without RoPE)."""
        return (self.cos, self.sin) if self.rope else (placeholder, placeholder)

    @property
    def rope(self) -> bool:
        return self.cos is not None

    @property
    def edges(self) -> int:
        """The edges of the visible band that masked tiles test (flash_tiles.score_tile): the left
        one with a window; the right one when it is finite; kv_len with padding, or unless the right
        edge is the diagonal (then a key at or past S is past every valid query's position too)."""
        edges = LEFT_EDGE.value if self.left < NO_LIMIT else 0
        if self.right < NO_LIMIT:
            edges |= RIGHT_EDGE.value
        if self.seq_lens is not None or self.right != 0:
            edges |= LENGTH_EDGE.value
        return edges

    @functools.cached_property
    def tma_capable(self) -> bool:
        """16-bit inputs: what use_tma needs of the problem itself."""
        return self.dtype in TMA_DTYPES

    @functools.cached_property
    def scale_log2(self) -> float:
        return self.scale * math.log2(math.e)

    @functools.cached_property
    def launch_kwargs(self) -> dict:
        """The keyword arguments of every flash kernel launch: SEQ_BUCKET (a tuning key) and
        the constexprs (FlashKernel remembers its config by them); computed once per problem."""
        return {
            "SEQ_BUCKET": self.seq_bucket,
            "HEAD_DIM": self.head_dim,
            "D_PAD": max(16, triton.next_power_of_2(self.head_dim)),  # tl.dot needs K >= 16
            "CAUSAL": self.causal,
            "ALIBI": self.slopes is not None,
            "HAS_SEQ_LENS": self.seq_lens is not None,
            "EDGES": self.edges,
            # tf32 would fail the fp32 error bound; fp16/bf16 inputs ignore this
            "PRECISION": "ieee" if self.dtype == torch.float32 else "tf32",
            "SPARSE_BLOCK": self.sparse_block,
            "VARLEN": self.cu_seqlens is not None,
        }

    @functools.cached_property
    def rotation_kwargs(self) -> dict:
        """launch_kwargs without the masking constexprs, for RoPE's rotation pass (flash_rope)."""
        return {name: value for name, value in self.launch_kwargs.items() if name not in ("CAUSAL", "ALIBI", "HAS_SEQ_LENS", "EDGES", "SPARSE_BLOCK")}


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised memory for a kernel output (tests swap in NaN-filled memory to catch
    elements a kernel forgets to write)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Autotuning compiles every candidate for every new constexpr combination (causal, rope, alibi,
# D, ...), seconds each, so each kernel gets a short hand-chosen list per head-dim bound, and
# only problems at least this long (the benchmark shapes) pay for tuning; shorter ones (tests,
# `attnbench check`) take the first candidate and compile one config per kernel.
TUNE_FROM_SEQ = 4096
_TUNING_KEY = ["HEAD_DIM", "SEQ_BUCKET", "CAUSAL", "ALIBI", "PRECISION", "TMA", "ROPE", "SPARSE_BLOCK", "VARLEN"]

# A block-sparse launch needs tiles that divide its mask's block (a tile never straddles two
# blocks): candidates that do not are dropped, and this tile stands in when none is left, so a
# block must be a multiple of SPARSE_TILE (the interpreter's and fp32's tiles are 32 or less).
SPARSE_TILE = 32 if INTERPRET else 64

TMA_DTYPES = (torch.float16, torch.bfloat16)  # what tma_tensors' alignment rule (8 elements, 16 bytes) assumes

# Tiles through TMA descriptors where use_tma allows; False reads every tile through pointers
# (A/B timing: python3 -m attnbench.devtools.tile_sweep --loads pointer)
TMA_LOADS = True


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` (-1: the CPU) is a Hopper or newer GPU."""
    return device_index >= 0 and torch.cuda.get_device_capability(device_index)[0] >= 9


def stats_row_length(t: int) -> int:
    """Row length of the per-row statistics (lse, delta [B, Hq, T] float32): T rounded up to 4
    floats, so that every (b, h) row starts 16-byte aligned, as a TMA descriptor needs."""
    return -(-t // 4) * 4


def blocks(n: int, block: int) -> int:
    """ceil(n / block) (triton.cdiv, without its constexpr-function wrapper's host cost)."""
    return -(-n // block)


class _Scratch:
    """triton's allocator for the tensor descriptors a launch builds on the device: one buffer
    per stream, reused while large enough (launches on one stream run in order), so a launch
    costs no allocation; under CUDA graph capture each launch gets its own (the graph's pool)."""

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}

    def __call__(self, size: int, alignment: int, stream: int) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            return torch.empty(size, dtype=torch.int8, device="cuda")
        buffer = self.buffers.get(stream)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[stream] = torch.empty(size, dtype=torch.int8, device="cuda")
        return buffer


_scratch = _Scratch()


def use_tma(problem: FlashProblem, *tensors: torch.Tensor) -> bool:
    """Whether a launch over ``tensors`` (the ones its loops read tiles of) takes them through
    TMA descriptors: 16-bit inputs and tma_tensors."""
    return problem.tma_capable and tma_tensors(*tensors)


def tma_tensors(*tensors: torch.Tensor) -> bool:
    """Whether tiles of these 16-bit tensors (TMA_DTYPES) can be read through TMA descriptors:
    TMA_LOADS on, a Hopper or newer GPU, each tensor with unit column stride and its base and
    other strides 16-byte aligned. Sets triton's allocator for the descriptors when it says yes."""
    if not (TMA_LOADS and _has_tma(tensors[0].get_device())):
        return False
    for x in tensors:
        strides = x.stride()
        if strides[-1] != 1 or x.data_ptr() % 16 or any(stride % 8 for stride in strides[:-1]):  # 8 x 2 bytes
            return False
    triton.set_allocator(_scratch)  # a context variable: set where the launch runs (autograd's backward thread too)
    return True


def tile_config(block_m: int, block_n: int, warps: int, stages: int, max_registers: int = 0) -> triton.Config:
    """A tile; max_registers (per thread, 0: the compiler's choice) below the compiler's choice lets
    more programs share an SM, for the price of any spills it causes."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages, maxnreg=max_registers or None
    )


class FlashKernel:
    """An autotuned flash kernel, launched as ``kernel[grid](*args, SEQ_BUCKET=..., **constexprs)``.

    A GPT small training step is host-bound (PERF_NOTES 7), and triton spends tens of
    microseconds of host time per launch binding and specialising our ~55 arguments, so:
    - the config the autotuner chose is remembered per (q's dtype, keyword arguments), a
      superset of the autotuner's key, so Autotuner.run runs once per key;
    - on a GPU, the compiled kernel a launch returned is remembered per launch_signature (a
      superset of what triton specialises on), and later launches with that signature call its
      launcher directly, skipping JITFunction.run and CompiledKernel's per-launch wrapper
      (unless triton's launch hooks, e.g. its profiler's, are set).
    """

    MAX_SIGNATURES = 256  # new shapes beyond this start the cache afresh

    def __init__(self, autotuner, by_head_dim: dict[int, list[triton.Config]]):
        self.autotuner = autotuner
        self.by_head_dim = by_head_dim  # flash_autotune's candidate lists
        self.chosen: dict[tuple, triton.Config] = {}
        self.compiled: dict[tuple, tuple] = {}  # launch_signature -> (CompiledKernel, trailing args, grid meta)
        self.direct = not INTERPRET
        self.tensors = 0  # how many leading arguments are tensors (the same at every launch)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs) -> None:
        if not self.tensors:
            self.tensors = next(i for i, arg in enumerate(args) if not isinstance(arg, torch.Tensor))
        signature = launch_signature(args, kwargs, self.tensors) if self.direct else None
        hit = self.compiled.get(signature)  # None (no direct launches) is never a stored signature
        if hit is not None:
            kernel, tail, meta = hit
            run_compiled(kernel, (*grid(meta), 1), (*args, *tail))
            return
        key = (args[0].dtype, *kwargs.items())
        config = self.chosen.get(key)
        if config is None:
            kernel = self.autotuner[grid](*args, **kwargs)
            config = self.chosen[key] = self.autotuner.best_config
        else:
            kernel = self.autotuner.fn[grid](*args, **kwargs, **config.all_kwargs())
        if signature is not None:
            meta = {**kwargs, **config.all_kwargs()}
            tail = tuple(meta[name] for name in self.autotuner.fn.arg_names[len(args):])
            if len(self.compiled) >= self.MAX_SIGNATURES:
                self.compiled.clear()
            self.compiled[signature] = (kernel, tail, meta)

    @contextlib.contextmanager
    def forced(self, config: triton.Config) -> Iterator[None]:
        """Every launch inside runs ``config`` (no pruning, no benchmarking): tile sweeps."""
        tuner = self.autotuner
        saved = tuner.configs, tuner.cache, self.chosen, self.compiled
        tuner.configs, tuner.cache, self.chosen, self.compiled = [config], {}, {}, {}
        try:
            yield
        finally:
            tuner.configs, tuner.cache, self.chosen, self.compiled = saved


def run_compiled(kernel, grid: tuple[int, int, int], args: tuple) -> None:
    """Launch the CompiledKernel ``kernel`` (what a JITFunction launch returned) over ``grid`` on the current
    stream with ``args``, every parameter's in order (constexprs too), calling its launcher directly, or
    through CompiledKernel's own wrapper where triton's launch hooks are set (a profiler's)."""
    if _no_launch_hooks():
        driver = triton.runtime.driver.active
        stream = driver.get_current_stream(driver.get_current_device())
        kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, None, None, None, *args)
    else:
        kernel[grid](*args)


def _no_launch_hooks() -> bool:
    """No launch hook is set (triton keeps them as chains that are empty unless a profiler joins)."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return all(hook is None or not getattr(hook, "calls", True) for hook in hooks)


def launch_signature(args: tuple, kwargs: dict, tensors: int) -> tuple:
    """Everything a compiled flash kernel depends on beyond pointer values, for launches whose
    first ``tensors`` arguments are the tensors: the first tensor's device and dtype (the other
    tensors' dtypes follow from it and the keyword arguments: k, v, o and the gradients share
    q's, the rest are float32 or int32 or q itself as a placeholder), every tensor's 16-byte
    alignment, every scalar's value, the keyword arguments. Triton specialises on less
    (integers only by divisibility by 16), so one signature never covers two specialisations."""
    first = args[0]
    return (first.get_device(), first.dtype, *[a.data_ptr() % 16 == 0 for a in args[:tensors]], *args[tensors:], *kwargs.items())


def flash_autotune(by_head_dim: dict[int, list[triton.Config]], fp32: triton.Config, interpret: triton.Config):
    """Decorator: a FlashKernel over triton.autotune. by_head_dim maps a D_PAD bound (64, 128,
    256) to its candidates, best guess first; fp32 inputs (FMA dots, twice the bytes per tile)
    get one small tile; TRITON_INTERPRET gets one tiny tile (tuning is pointless there)."""
    if INTERPRET:
        return lambda fn: FlashKernel(triton.autotune([interpret], key=_tuning_key(fn))(fn), by_head_dim)

    def candidates(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # constexprs and SEQ_BUCKET arrive as kwargs, sizes as named args
        if args["PRECISION"] == "ieee":
            return [fp32]
        picks = candidates_for(by_head_dim, args["D_PAD"])
        block = args.get("SPARSE_BLOCK", 0)
        if block:
            fits = [c for c in picks if block % c.kwargs["BLOCK_M"] == 0 and block % c.kwargs["BLOCK_N"] == 0]
            picks = fits or _sparse_fallback(args["D_PAD"])
        return picks if args["SEQ_BUCKET"] >= TUNE_FROM_SEQ else picks[:1]

    every = [fp32] + [config for picks in by_head_dim.values() for config in picks]
    prune = {"early_config_prune": candidates}
    return lambda fn: FlashKernel(triton.autotune(every, key=_tuning_key(fn), prune_configs_by=prune)(fn), by_head_dim)


def _sparse_fallback(d_pad: int) -> list[triton.Config]:
    """Tiles of one SPARSE_TILE square for a head dim whose tuned tiles do not divide the block
    (D 128 and 256 at block 64): the untuned guess first, a second for the autotuner to weigh
    (4 warps, 3 stages; a candidate that overflows shared memory is skipped by triton)."""
    if d_pad <= 64:
        return [tile_config(SPARSE_TILE, SPARSE_TILE, 4, 2)]
    return [tile_config(SPARSE_TILE, SPARSE_TILE, 8, 2), tile_config(SPARSE_TILE, SPARSE_TILE, 4, 3)]


def _tuning_key(fn) -> list[str]:
    """The tuning key's names that are arguments of kernel ``fn`` (triton rejects others)."""
    return [name for name in _TUNING_KEY if name in fn.arg_names]


def candidates_for(by_head_dim: dict[int, list[triton.Config]], head_dim: int) -> list[triton.Config]:
    """The candidate list of the smallest head-dim bound that holds ``head_dim``."""
    return by_head_dim[min(bound for bound in by_head_dim if bound >= head_dim)]
