"""Fused one-token steps of linear attention and DeltaNet: the state update and the readout in one
pass, each state element read once and written once (a step is bound by the state's bytes:
B x Hkv x Dk x Dv float32, against a few vectors of q, k, v).

Tiles are [DK_PAD, BLOCK_V]: all of a head's key dimension (the delta rule's S^T k and the
readouts reduce over it) by a block of its value dimension. The query heads of one kv head (GQA)
read the updated tile while it is in registers. Semantics and the plain-torch twins:
models/state_decode.py (linear_step, deltanet_step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnbench.kernels.flash_tiles import INTERPRET

EPS = tl.constexpr(1e-6)  # linear attention's normaliser guard (models/feature_attention.py's EPS)
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's floor on ||x||


@triton.jit
def _feature_map(x):
    """phi(x) = elu(x) + 1, as exp(x) below 0 and x + 1 above (no cancellation for very negative x)."""
    return tl.exp(tl.minimum(x, 0.0)) + tl.maximum(x, 0.0)


@triton.jit
def _unit(x):
    """x / max(||x||, NORM_EPS), F.normalize's L2 normalisation (padding elements are 0)."""
    return x / tl.maximum(tl.sqrt(tl.sum(x * x, 0)), NORM_EPS)


@triton.jit
def _row(X, b, h, stride_b, stride_h, stride_d, cols, n):
    """x[b, h, cols] in float32 (0 past n)."""
    return tl.load(X + b.to(tl.int64) * stride_b + h * stride_h + cols * stride_d, mask=cols < n, other=0.0).to(tl.float32)


@triton.jit
def _linear_step_kernel(
    Q, K, V, KV, K_SUM, O,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
    stride_sb, stride_sh, stride_sk, stride_sv, stride_zb, stride_zh, stride_zk, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid (B, Hkv): one program owns a head, since every value block's normaliser needs the
    head's updated k_sum; it walks the value blocks. q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv],
    kv float32 [B, Hkv, Dk, Dv] and k_sum float32 [B, Hkv, Dk] updated in place, o [B, Hq, Dv]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kd = tl.arange(0, DK_PAD)
    fk = tl.where(kd < DK, _feature_map(_row(K, b, h, stride_kb, stride_kh, stride_kd, kd, DK)), 0.0)
    z_ptrs = K_SUM + b.to(tl.int64) * stride_zb + h * stride_zh + kd * stride_zk
    k_sum = tl.load(z_ptrs, mask=kd < DK, other=0.0) + fk
    tl.store(z_ptrs, k_sum, mask=kd < DK)
    state = KV + b.to(tl.int64) * stride_sb + h * stride_sh
    for v_start in range(0, DV, BLOCK_V):
        vd = v_start + tl.arange(0, BLOCK_V)
        tile = kd[:, None] * stride_sk + vd[None, :] * stride_sv
        inside = (kd[:, None] < DK) & (vd[None, :] < DV)
        v = _row(V, b, h, stride_vb, stride_vh, stride_vd, vd, DV)
        s = tl.load(state + tile, mask=inside, other=0.0) + fk[:, None] * v[None, :]
        tl.store(state + tile, s, mask=inside)
        for g in tl.static_range(GROUP):
            hq = h * GROUP + g
            fq = tl.where(kd < DK, _feature_map(_row(Q, b, hq, stride_qb, stride_qh, stride_qd, kd, DK)), 0.0)
            o = tl.sum(fq[:, None] * s, 0) / (tl.sum(fq * k_sum, 0) + EPS)
            tl.store(O + b.to(tl.int64) * stride_ob + hq * stride_oh + vd * stride_od, o.to(O.dtype.element_ty), mask=vd < DV)


@triton.jit
def _deltanet_step_kernel(
    Q, K, V, BETA, S, O,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
    stride_beta_b, stride_beta_h, stride_sb, stride_sh, stride_sk, stride_sv, stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DK_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_BETA: tl.constexpr,
):
    """Grid (B, Hkv, cdiv(Dv, BLOCK_V)): the delta rule's columns are independent, so value blocks
    are programs of their own. q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv], beta [B, Hkv] (1/2
    without HAS_BETA), S float32 [B, Hkv, Dk, Dv] updated in place, o [B, Hq, Dv]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kd = tl.arange(0, DK_PAD)
    vd = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    k = _unit(_row(K, b, h, stride_kb, stride_kh, stride_kd, kd, DK))
    v = _row(V, b, h, stride_vb, stride_vh, stride_vd, vd, DV)
    beta = tl.load(BETA + b.to(tl.int64) * stride_beta_b + h * stride_beta_h).to(tl.float32) if HAS_BETA else 0.5
    tile = S + b.to(tl.int64) * stride_sb + h * stride_sh + kd[:, None] * stride_sk + vd[None, :] * stride_sv
    inside = (kd[:, None] < DK) & (vd[None, :] < DV)
    s = tl.load(tile, mask=inside, other=0.0)
    error = v - tl.sum(s * k[:, None], 0)  # v - S^T k, this block's columns
    s += k[:, None] * (beta * error)[None, :]
    tl.store(tile, s, mask=inside)
    for g in tl.static_range(GROUP):
        hq = h * GROUP + g
        q = _unit(_row(Q, b, hq, stride_qb, stride_qh, stride_qd, kd, DK))
        o = tl.sum(s * q[:, None], 0)
        tl.store(O + b.to(tl.int64) * stride_ob + hq * stride_oh + vd * stride_od, o.to(O.dtype.element_ty), mask=vd < DV)


def _block_v(dk_pad: int, dv: int) -> int:
    """Value columns per tile: about 4K float32 state elements a tile (32 registers a thread at 4 warps)."""
    return min(triton.next_power_of_2(dv), max(16 if INTERPRET else 8, 4096 // dk_pad))


def _check(q, k, v, *states) -> tuple[int, int]:
    """(GROUP, DK_PAD) after checking q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv] against float32 states."""
    b, hq, dk = q.shape
    if k.shape[0] != b or k.shape[2] != dk or v.shape[:2] != k.shape[:2] or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: want [B, Hq, Dk], [B, Hkv, Dk], [B, Hkv, Dv], Hq a multiple of Hkv")
    for state in states:
        if state.dtype != torch.float32 or state.shape[:2] != k.shape[:2]:
            raise ValueError(f"states are float32 [B, Hkv, ...]; got {state.dtype} {tuple(state.shape)}")
    return hq // k.shape[1], max(16, triton.next_power_of_2(dk))


def linear_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor) -> torch.Tensor:
    """One token of causal linear attention (phi = elu + 1, normalised): o [B, Hq, Dv] in q's dtype.

    q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv] (float16, bfloat16 or float32, any strides; Hq a
    multiple of Hkv); the state kv float32 [B, Hkv, Dk, Dv] and k_sum float32 [B, Hkv, Dk] take the
    token in place: kv += phi(k) v^T, k_sum += phi(k); then o = phi(q) kv / (phi(q) . k_sum + 1e-6).
    The plain-torch twin: attnbench.models.state_decode.linear_step.
    """
    group, dk_pad = _check(q, k, v, kv, k_sum)
    b, hkv, dv = v.shape
    o = torch.empty(b, q.shape[1], dv, dtype=q.dtype, device=q.device)
    _linear_step_kernel[(b, hkv)](
        q, k, v, kv, k_sum, o, *q.stride(), *k.stride(), *v.stride(), *kv.stride(), *k_sum.stride(), *o.stride(),
        GROUP=group, DK=q.shape[2], DV=dv, DK_PAD=dk_pad, BLOCK_V=_block_v(dk_pad, dv),
    )
    return o


def deltanet_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, beta: torch.Tensor | None = None
) -> torch.Tensor:
    """One token of DeltaNet: o [B, Hq, Dv] in q's dtype.

    q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv] (float16, bfloat16 or float32, any strides; Hq a
    multiple of Hkv), beta [B, Hkv] (None: 1/2); q and k are L2-normalised here. The state S
    float32 [B, Hkv, Dk, Dv] takes the token in place: S += k (beta (v - S^T k))^T; then o = S^T q.
    The plain-torch twin: attnbench.models.state_decode.deltanet_step.
    """
    group, dk_pad = _check(q, k, v, state)
    b, hkv, dv = v.shape
    block_v = _block_v(dk_pad, dv)
    o = torch.empty(b, q.shape[1], dv, dtype=q.dtype, device=q.device)
    beta_strides = (0, 0) if beta is None else beta.stride()
    _deltanet_step_kernel[(b, hkv, triton.cdiv(dv, block_v))](
        q, k, v, q if beta is None else beta, state, o,
        *q.stride(), *k.stride(), *v.stride(), *beta_strides, *state.stride(), *o.stride(),
        GROUP=group, DK=q.shape[2], DV=dv, DK_PAD=dk_pad, BLOCK_V=block_v, HAS_BETA=beta is not None,
    )
    return o
