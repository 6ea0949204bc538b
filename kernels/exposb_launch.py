"""ExpoSB's launchers: the tiles per kernel and head dim, the RoPE tables, the input checks and
the prepass, forward and backward launches (kernels in exposb_prepass.py, exposb_fwd.py and
exposb_bwd.py)."""

from __future__ import annotations

import functools

import torch
import triton

from attnbench.kernels.exposb_bwd import exposb_dkdv_kernel, exposb_dq_kernel
from attnbench.kernels.exposb_fwd import exposb_fwd_kernel
from attnbench.kernels.exposb_prepass import exposb_prepass_kernel
from attnbench.kernels.flash_launch import TMA_DTYPES, tma_tensors
from attnbench.kernels.reference import rope_angles

ROPE_BASE = 10000.0
PARAM_NAMES = ("lam", "alpha", "beta", "gamma", "mu", "sigma", "delta")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and largest head dim. The loops read q', k'
# as plain tiles, as the standard kernels' do (flash_fwd.py, flash_bwd.py; the forward's k', v
# through TMA on Hopper, the backward's through pointers). D 64 and 128: the fastest of
# bench/devtools/exposb_tile_sweep.py's candidates at T 1k and 4k, causal, on an H100
# (results/reference-h100/exposb-profile/; four warps won in every kernel, 1.3-2.3x the eight-warp
# tiles before). "dkdv-bidirectional": bidirectional dk/dv holds a second accumulator (PERF_NOTES 17),
# and with four warps it spills 276 B (D 64) / 704 B (D 128) a thread where causal spills 4 / 188
# (triton 3.6, sm_90a). At D 128 the bidirectional sweep still put four warps first, spills and all
# (32, 64, 4, 2): 1.63 / 5.30 ms at T 1k / 4k against 2.43 / 8.26 for eight warps; H100,
# results/reference-h100/exposb-tiles/); D 64's bidirectional tile was not timed and keeps eight
# warps. D 256: the least-spilling tile of a compile-only sweep, untimed.
_GPU_TILES = {
    64: {"fwd": (128, 64, 4, 3), "dq": (64, 32, 4, 3), "dkdv": (64, 64, 4, 2), "dkdv-bidirectional": (64, 64, 8, 2)},
    128: {"fwd": (64, 64, 4, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 64, 4, 3), "dkdv-bidirectional": (32, 64, 4, 2)},
    256: {"fwd": (64, 32, 8, 2), "dq": (32, 32, 8, 2), "dkdv": (32, 32, 8, 2)},
}
_GPU_FP32_TILES = (32, 32, 4, 1)  # fp32 inputs: FMA dots, twice the bytes per tile (the standard kernels' choice)
# under the CPU interpreter small tiles, so tests at T <= 64 cover every regime (below,
# diagonal, above) with several tiles each
_INTERPRETER_TILES = {"fwd": (16, 16, 1), "dq": (16, 16, 1), "dkdv": (16, 16, 1)}
# the prepass's rows per program (flash_rope.rope_kernel's), 4 warps; 16 under the interpreter
_PREPASS_ROWS = {64: 64, 128: 32, 256: 16}


def gpu_tiles(head_dim: int) -> dict:
    """The _GPU_TILES entries of the smallest listed head dim >= ``head_dim`` (the dict itself: the tile sweep forces tiles in it)."""
    return _GPU_TILES[min(d for d in _GPU_TILES if d >= head_dim)]


def tile_entry(tiles: dict, kernel: str, causal: bool) -> str:
    """The key of one head dim's _GPU_TILES entry that ``kernel`` reads under its mask."""
    bidirectional = f"{kernel}-bidirectional"
    return bidirectional if not causal and bidirectional in tiles else kernel


def kernel_tiles(device: torch.device, head_dim: int, kernel: str, dtype: torch.dtype, causal: bool) -> tuple[int, int, dict]:
    """BLOCK_M, BLOCK_N and the launch options of ``kernel`` (fwd, dq or dkdv) under its mask."""
    if device.type != "cuda":
        block_m, block_n, _ = _INTERPRETER_TILES[kernel]
        return block_m, block_n, {}
    if dtype == torch.float32:
        block_m, block_n, warps, stages = _GPU_FP32_TILES
    else:
        tiles = gpu_tiles(head_dim)
        block_m, block_n, warps, stages = tiles[tile_entry(tiles, kernel, causal)]
    return block_m, block_n, {"num_warps": warps, "num_stages": stages}


def _prepass_rows(device: torch.device, head_dim: int) -> tuple[int, dict]:
    """Rows per prepass program and its launch options."""
    if device.type != "cuda":
        return 16, {}
    return _PREPASS_ROWS[min(d for d in _PREPASS_ROWS if d >= head_dim)], {"num_warps": 4}


@functools.lru_cache(maxsize=16)
def _angle_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [S, D/2] of the RoPE angles (the reference's own tables)."""
    return tuple(t.contiguous() for t in rope_angles(torch.arange(length, device=device), head_dim, ROPE_BASE))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"exposb: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit [B, T, Hq, D], [B, S, Hkv, D]")
    if d < 32 or d > 256 or d & (d - 1):
        raise ValueError(f"exposb triton kernel needs head_dim a power of two in [32, 256], not {d}")
    if k.shape[1] < t:
        raise ValueError("exposb triton kernel needs S >= T (queries are the last T positions)")
    for name, value in params.items():
        if value.shape != (hq,):
            raise ValueError(f"exposb: {name} must have shape [{hq}] (one value per query head), not {tuple(value.shape)}")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


def exposb_transform(x, heads, shift, params):
    """x' [B, L, Hq, D] of x [B, L, Hx, D] (Hq = ``heads``; each query head h transforms x's head
    h // (Hq / Hx) with its own parameters), row t at position t + shift: a new contiguous tensor
    of x's dtype, rounded once. The prepass of the keys (shift 0); the forward forms the queries'
    (shift S - T) itself, the same way."""
    b, length, _, d = x.shape
    cos, sin = _angle_tables(length + shift, d, x.device)
    rows, launch = _prepass_rows(x.device, d)
    y = torch.empty(b, length, heads, d, device=x.device, dtype=x.dtype)
    exposb_prepass_kernel[(triton.cdiv(length, rows), b * heads)](
        x, y, cos, sin, *(params[name] for name in PARAM_NAMES),
        *x.stride(), *y.stride(), heads, heads // x.shape[2], length, shift, D=d, BLOCK=rows, **launch,
    )
    return y


def exposb_forward(q, k_t, v, params, causal, seq_lens, out_dtype, keep_q_t=False):
    """o [B, T, Hq, D] in ``out_dtype``, the LSE [B, Hq, T] float32 in log2 units, and (keep_q_t) q'
    [B, T, Hq, D] in q's dtype as the forward formed it (else None), from the raw q [B, T, Hq, D],
    the prepass's k' [B, S, Hq, D] (exposb_transform) and v [B, S, Hkv, D]."""
    b, t, hq, d = q.shape
    s, hkv = v.shape[1], v.shape[2]
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    lse = torch.empty(b, hq, t, device=q.device, dtype=torch.float32)
    q_t = torch.empty(q.shape, device=q.device, dtype=q.dtype) if keep_q_t else None
    q_t_out = o if q_t is None else q_t  # a pointer the kernel never writes through unless STORE_QT
    cos, sin = _angle_tables(s, d, q.device)
    block_m, block_n, launch = kernel_tiles(q.device, d, "fwd", q.dtype, causal)
    grid = (triton.cdiv(t, block_m), b * hq)
    exposb_fwd_kernel[grid](
        q, k_t, v, o, lse, q_t_out, cos, sin, *(params[name] for name in PARAM_NAMES), seq_lens,
        *q.stride(), *k_t.stride(), *v.stride(), *o.stride(), *q_t_out.stride(),
        hq, hq // hkv, t, s, d**-0.5,
        HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), TMA=q.dtype in TMA_DTYPES and tma_tensors(k_t, v), STORE_QT=keep_q_t,
        **launch,
    )
    return o, lse, q_t


def exposb_backward(q, k, q_t, k_t, v, o, lse, do, params, causal, seq_lens):
    """dq, dk, dv (dtypes of q, k, v) and the parameter gradients float32 [7, Hq] (PARAM_NAMES
    order), from the raw q, k, q' (the forward's) and k' (exposb_transform), the forward's o (float32) and lse."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    di = torch.empty(b, hq, t, device=q.device, dtype=torch.float32)  # D_m = rowsum(dO * O), written by the dq kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cos, sin = _angle_tables(s, d, q.device)
    common = dict(HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, DOT_PRECISION=_dot_precision(q.dtype))
    param_values = [params[name] for name in PARAM_NAMES]

    block_m, block_n, launch = kernel_tiles(q.device, d, "dq", q.dtype, causal)
    q_blocks = triton.cdiv(t, block_m)
    q_partials = torch.zeros(len(PARAM_NAMES), b, q_blocks, hq, device=q.device, dtype=torch.float32)
    exposb_dq_kernel[(q_blocks, b * hq)](
        q, q_t, k_t, v, o, do, dq, lse, di, cos, sin, *param_values, seq_lens, q_partials,
        *q.stride(), *q_t.stride(), *k_t.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        q_partials.stride(0), hq, hq // hkv, t, s, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    block_m, block_n, launch = kernel_tiles(q.device, d, "dkdv", q.dtype, causal)
    k_blocks = triton.cdiv(s, block_n)
    k_partials = torch.zeros(len(PARAM_NAMES), b, k_blocks, hq, device=q.device, dtype=torch.float32)
    exposb_dkdv_kernel[(k_blocks, b * hkv)](
        k, q_t, k_t, v, do, dk, dv, lse, di, cos, sin, *param_values, seq_lens, k_partials,
        *k.stride(), *q_t.stride(), *k_t.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        k_partials.stride(0), hq, t, s, d**-0.5,
        GROUP=hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    return dq, dk, dv, q_partials.sum((1, 2)) + k_partials.sum((1, 2))
