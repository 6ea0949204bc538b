"""ExpoSB's launchers: the tiles per kernel and head dim, the RoPE tables, the input checks and
the forward and backward launches (kernels in exposb_fwd.py and exposb_bwd.py)."""

from __future__ import annotations

import functools

import torch
import triton

from attnbench.kernels.exposb_bwd import exposb_dkdv_kernel, exposb_dq_kernel
from attnbench.kernels.exposb_fwd import exposb_fwd_kernel
from attnbench.kernels.reference import rope_angles

ROPE_BASE = 10000.0
PARAM_NAMES = ("lam", "alpha", "beta", "gamma", "mu", "sigma", "delta")

# (BLOCK_M, BLOCK_N, num_warps) per kernel and largest head dim: picked so that ptxas reports
# no or little register spilling for sm_90 (to be tuned on the GPU)
_GPU_TILES = {
    64: {"fwd": (128, 64, 8), "dq": (64, 32, 8), "dkdv": (64, 64, 8)},
    128: {"fwd": (128, 64, 8), "dq": (32, 64, 8), "dkdv": (32, 64, 8)},
    256: {"fwd": (64, 32, 8), "dq": (32, 32, 8), "dkdv": (32, 32, 8)},
}
# under the CPU interpreter small tiles, so tests at T <= 64 cover every regime (below,
# diagonal, above) with several tiles each
_INTERPRETER_TILES = {"fwd": (16, 16, 1), "dq": (16, 16, 1), "dkdv": (16, 16, 1)}


def _tiles(device: torch.device, head_dim: int, kernel: str) -> tuple[int, int, dict]:
    """BLOCK_M, BLOCK_N and the launch options of ``kernel`` (fwd, dq or dkdv)."""
    if device.type != "cuda":
        block_m, block_n, _ = _INTERPRETER_TILES[kernel]
        return block_m, block_n, {}
    block_m, block_n, warps = _GPU_TILES[min(d for d in _GPU_TILES if d >= head_dim)][kernel]
    return block_m, block_n, {"num_warps": warps, "num_stages": 2}


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


def exposb_forward(q, k, v, params, causal, seq_lens, out_dtype):
    """o [B, T, Hq, D] in ``out_dtype`` and the LSE [B, Hq, T] float32 in log2 units."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    lse = torch.empty(b, hq, t, device=q.device, dtype=torch.float32)
    cos, sin = _angle_tables(s, d, q.device)
    block_m, block_n, launch = _tiles(q.device, d, "fwd")
    grid = (triton.cdiv(t, block_m), b * hq)
    exposb_fwd_kernel[grid](
        q, k, v, o, lse, cos, sin, *(params[name] for name in PARAM_NAMES), seq_lens,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        hq, hq // hkv, t, s, d**-0.5,
        HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), **launch,
    )
    return o, lse


def exposb_backward(q, k, v, o, lse, do, params, causal, seq_lens):
    """dq, dk, dv (dtypes of q, k, v) and the parameter gradients float32 [7, Hq] (PARAM_NAMES order)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    di = (do.float() * o).sum(-1).transpose(1, 2).contiguous()  # D_m = rowsum(dO * O), O float32: [B, Hq, T]
    dq = torch.empty_like(q)
    # dk, dv per query head (each has its own k'), in float32 when a group's heads are then summed
    per_head = dict(device=k.device, dtype=k.dtype if hq == hkv else torch.float32)
    dk, dv = torch.empty(b, s, hq, d, **per_head), torch.empty(b, s, hq, d, **per_head)
    cos, sin = _angle_tables(s, d, q.device)
    common = dict(HAS_LENS=seq_lens is not None, CAUSAL=causal, D=d, DOT_PRECISION=_dot_precision(q.dtype))
    param_values = [params[name] for name in PARAM_NAMES]

    block_m, block_n, launch = _tiles(q.device, d, "dq")
    q_blocks = triton.cdiv(t, block_m)
    q_partials = torch.zeros(len(PARAM_NAMES), b, q_blocks, hq, device=q.device, dtype=torch.float32)
    exposb_dq_kernel[(q_blocks, b * hq)](
        q, k, v, do, dq, lse, di, cos, sin, *param_values, seq_lens, q_partials,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        q_partials.stride(0), hq, hq // hkv, t, s, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    block_m, block_n, launch = _tiles(q.device, d, "dkdv")
    k_blocks = triton.cdiv(s, block_n)
    k_partials = torch.zeros(len(PARAM_NAMES), b, k_blocks, hq, device=q.device, dtype=torch.float32)
    exposb_dkdv_kernel[(k_blocks, b * hq)](
        q, k, v, do, dk, dv, lse, di, cos, sin, *param_values, seq_lens, k_partials,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        k_partials.stride(0), hq, hq // hkv, t, s, d**-0.5,
        BLOCK_M=block_m, BLOCK_N=block_n, **common, **launch,
    )
    if hq != hkv:
        dk = dk.view(b, s, hkv, hq // hkv, d).sum(3).to(k.dtype)
        dv = dv.view(b, s, hkv, hq // hkv, d).sum(3).to(v.dtype)
    return dq, dk, dv, q_partials.sum((1, 2)) + k_partials.sum((1, 2))
