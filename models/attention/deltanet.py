"""deltanet: linear attention with the delta rule (Schlag et al. 2021; Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length").

A state S [Dv, Dk] per kv head is corrected towards each new key-value pair,

    S_t = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_t^T,     o_t = S_t q_t

with q and k L2-normalised (the core does it) and beta_t in (0, 1) the write strength,
sigmoid of a learned projection of x per kv head and token. GQA: every query head of a
group reads its kv head's state. Causal only; key padding: see models/causal_padding.py.
Kernel level (``attend`` without beta, see models/token_conditioned.py): beta = 1/2.

Impls: the recurrent loop over tokens (the definition); the chunked WY form, where within a
chunk of C tokens the writes u = T (V - K S_0^T), T = (I + tril(diag(beta) K K^T, -1))^-1
diag(beta), come from one triangular solve per chunk (all chunks at once) and only the
state is carried across chunks; fla's chunk_delta_rule (Triton). Both torch forms compute in
at least float32. No position information: the model adds absolute positions (or the layer
rotates q and k by RoPE); no scores, so no ALiBi.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.kernels import decode_cost
from attnbench.models import state_decode
from attnbench.models.causal_padding import zero_padded_queries
from attnbench.models.fla import fla_missing
from attnbench.models.float32_forms import outside_autocast
from attnbench.models.registry import MATMUL_BACKWARD, DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism
from attnbench.models.token_conditioned import TokenConditionedAttention

DEFAULT_CHUNK = 64


def _prepare(q, k, v, beta, upcast=True):
    """L2-normalised q, k and v, beta ([B, T, Hkv], 1/2 when None) in the compute dtype
    (>= float32; q's own dtype with upcast=False)."""
    work = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    if beta is None:
        beta = torch.full(k.shape[:3], 0.5, dtype=work, device=k.device)
    q, k = F.normalize(q.to(work), dim=-1), F.normalize(k.to(work), dim=-1)
    return q, k, v.to(work), beta.to(work)


def torch_reference(q, k, v, *, causal=True, seq_lens=None, beta=None, chunk=DEFAULT_CHUNK, upcast=True):
    """The recurrence, token by token: q [B, T, Hq, D], k/v [B, T, Hkv, D], beta [B, T, Hkv] -> [B, T, Hq, D].
    upcast=False keeps the state in the inputs' dtype (the low-precision reference of the tests'
    FlashAttention rule, as its attention_ref(upcast=False))."""
    dtype = q.dtype
    q, k, v, beta = _prepare(q, k, v, beta, upcast)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.view(b, t, hkv, hq // hkv, d)  # (B, T, Hkv, G, D)
    state = v.new_zeros(b, hkv, v.shape[-1], d)  # S (B, Hkv, Dv, Dk)
    outputs = []
    for i in range(t):
        error = v[:, i] - torch.einsum("bhvk,bhk->bhv", state, k[:, i])  # v_t - S_{t-1} k_t
        state = state + torch.einsum("bhv,bhk->bhvk", beta[:, i, :, None] * error, k[:, i])
        outputs.append(torch.einsum("bhvk,bhgk->bhgv", state, q[:, i]))  # S_t q_t
    o = torch.stack(outputs, dim=1).reshape(b, t, hq, -1)
    return zero_padded_queries(o, seq_lens).to(dtype)


@outside_autocast  # the state sums T writes, and the triangular solve has no bf16 kernel
def chunked(q, k, v, *, causal=True, seq_lens=None, beta=None, chunk=DEFAULT_CHUNK):
    """The chunked WY form: same arguments and result as the recurrence; a Python loop over
    T / chunk chunks carries the state, everything within a chunk is batched matmuls.
    Computed in float32, also under autocast."""
    dtype = q.dtype
    q, k, v, beta = _prepare(q, k, v, beta)
    b, t, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    group = hq // hkv
    pad = -t % chunk  # padded tail tokens: beta = 0 and k = 0, so they write nothing; their outputs are cut off
    q, k, v, beta = (F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) for x in (q, k, v, beta))
    n = (t + pad) // chunk

    def chunks(x):  # (B, T, Hkv, ...) -> (B, Hkv, N, C, ...)
        return x.reshape(b, n, chunk, hkv, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    k, v, beta = chunks(k), chunks(v), chunks(beta)  # (B, Hkv, N, C, D|Dv), (B, Hkv, N, C)
    q = chunks(q.reshape(b, t + pad, hkv, group, d)).transpose(3, 4).reshape(b, hkv, n, group * chunk, d)
    earlier = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    # (I + A) [U_v | W] = diag(beta) [V | K], A = beta_i k_i . k_j for j < i: all chunks in one solve
    a = (beta[..., None] * k @ k.transpose(-1, -2)) * earlier  # (B, Hkv, N, C, C)
    rhs = beta[..., None] * torch.cat([v, k], dim=-1)
    writes = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)  # diagonal taken as 1
    u_v, w = writes.split([dv, d], dim=-1)  # (B, Hkv, N, C, Dv), (B, Hkv, N, C, D)
    # query r sees the writes of keys j <= r of its chunk: the [G*C, C] mask repeats per query head
    within = (q @ k.transpose(-1, -2)) * earlier.logical_not().T.repeat(group, 1)  # (B, Hkv, N, G*C, C)
    state = v.new_zeros(b, hkv, dv, d)  # S (B, Hkv, Dv, Dk)
    outputs = []
    for i in range(n):
        u = u_v[:, :, i] - w[:, :, i] @ state.transpose(-1, -2)  # this chunk's writes given S_0: (B, Hkv, C, Dv)
        outputs.append(q[:, :, i] @ state.transpose(-1, -2) + within[:, :, i] @ u)  # (B, Hkv, G*C, Dv)
        state = state + u.transpose(-1, -2) @ k[:, :, i]
    o = torch.stack(outputs, dim=2).view(b, hkv, n, group, chunk, dv)
    o = o.permute(0, 2, 4, 1, 3, 5).reshape(b, n * chunk, hq, dv)[:, :t]
    return zero_padded_queries(o, seq_lens).to(dtype)


def fla_chunk(q, k, v, *, causal=True, seq_lens=None, beta=None, chunk=DEFAULT_CHUNK):
    """flash-linear-attention's chunk_delta_rule on the normalised q, k (scale 1: o_t = S_t q_t).
    fla takes one head count: k, v and beta are repeated to Hq (the group's states are equal)."""
    from fla.ops.delta_rule import chunk_delta_rule

    if beta is None:
        beta = torch.full(k.shape[:3], 0.5, dtype=q.dtype, device=k.device)
    group = q.shape[2] // k.shape[2]
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    k, v, beta = (x.repeat_interleave(group, dim=2).contiguous() for x in (k, v, beta.to(q.dtype)))
    o, _ = chunk_delta_rule(q.contiguous(), k, v, beta, scale=1.0)
    return zero_padded_queries(o, seq_lens)


def _fla_unsupported(cfg: LayerConfig, device, dtype) -> str | None:
    if dtype == torch.float32:
        return "fla's chunk_delta_rule takes bf16 or fp16 only (fla-core 0.6 refuses float32)"
    return "fla's chunk_delta_rule supports head_dim <= 256" if cfg.head_dim > 256 else None


class DeltaNetAttention(TokenConditionedAttention):
    """TokenConditionedAttention with beta = sigmoid(x W_beta + b) [B, T, Hkv]."""

    def __init__(self, cfg: LayerConfig, impls: dict[str, Impl]):
        super().__init__(cfg, impls, deltanet_options)
        self.beta = nn.Linear(cfg.dim, cfg.kv_heads)

    def token_options(self, x: torch.Tensor) -> dict:
        return {"beta": torch.sigmoid(self.beta(x))}


def deltanet_options(cfg: LayerConfig) -> dict:
    chunk = int(cfg.options.get("chunk", DEFAULT_CHUNK))
    if chunk <= 0:
        raise ValueError(f"deltanet chunk must be positive, not {chunk}")
    return {"chunk": chunk}


def deltanet_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """Chunked WY form, per token, chunks of C (normalisation, sigmoid not counted):
    per kv head: 2*C*D (beta K K^T), 2*C*D (the triangular solve for [U_v | W], ~C^2 * 2D per
        chunk), 2*D*D (W S^T), 2*D*D (the state update U^T K);
    per query head: 2*D*D (q S^T) + 2*C*D (q K^T within the chunk) + 2*C*D (times U)."""
    c, d = deltanet_options(cfg)["chunk"], cfg.head_dim
    per_kv_head = 4.0 * c * d + 4.0 * d * d
    per_query_head = 2.0 * d * d + 4.0 * c * d
    return batch * seq * (cfg.kv_heads * per_kv_head + cfg.heads * per_query_head)


IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch recurrence, token by token (the definition)"),
    "chunked": Impl("chunked", chunked, "torch, chunked WY form: one triangular solve, a loop over chunks"),
    "fla": Impl(
        "fla", fla_chunk, "flash-linear-attention chunk_delta_rule (Triton)",
        needs_cuda=True, missing=fla_missing("delta_rule"), unsupported=_fla_unsupported,
    ),
}

def _step_inputs(cfg: LayerConfig, batch: int, device, dtype):
    """One token q [B, Hq, D], k/v [B, Hkv, D], beta [B, Hkv] in (0, 1) and a random float32 state
    S [B, Hkv, D, D]: what the state holds after L tokens does not change the step's work."""
    q = torch.randn(batch, cfg.heads, cfg.head_dim, device=device).to(dtype)  # drawn in float32: one seed, the same token in every dtype
    k, v = (torch.randn(batch, cfg.kv_heads, cfg.head_dim, device=device).to(dtype) for _ in range(2))
    beta = torch.rand(batch, cfg.kv_heads, device=device).to(dtype)
    state = 0.01 * torch.randn(batch, cfg.kv_heads, cfg.head_dim, cfg.head_dim, device=device)
    return q, k, v, beta, state


def _torch_step(cfg, batch, context, queries, device, dtype):
    q, k, v, beta, state = _step_inputs(cfg, batch, device, dtype)
    return lambda: state_decode.deltanet_step(q, k, v, state, beta)[0]


def _triton_step(cfg, batch, context, queries, device, dtype):
    from attnbench.kernels.state_decode import deltanet_step

    q, k, v, beta, state = _step_inputs(cfg, batch, device, dtype)
    return lambda: deltanet_step(q, k, v, state, beta)  # the state takes the token in place


def _fla_step(cfg, batch, context, queries, device, dtype):
    """fla's fused_recurrent_delta_rule over one token, q and k L2-normalised in its kernel, no
    scale (o = S^T q, as ours); the new state comes back."""
    from fla.ops.delta_rule import fused_recurrent_delta_rule

    q, k, v, beta, state = _step_inputs(cfg, batch, device, dtype)
    q, k, v, beta = q[:, None], k[:, None], v[:, None], beta[:, None]  # (B, 1, H, D), beta (B, 1, H)
    return lambda: fused_recurrent_delta_rule(q, k, v, beta, scale=1.0, initial_state=state, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)[0]


def _state_bytes(cfg: LayerConfig) -> int:
    return decode_cost.deltanet_state_bytes(cfg.kv_heads, cfg.head_dim, cfg.head_dim)


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    d = cfg.head_dim
    return decode_cost.state_step_bytes(batch, _state_bytes(cfg), cfg.heads, cfg.kv_heads, d, d, itemsize, gates=cfg.kv_heads)


def _step_unsupported(cfg: LayerConfig, queries: int, device, dtype) -> str | None:
    return state_decode.why_no_step(cfg, queries)


DECODE = DecodeForm("state", _step_bytes, lambda cfg, context, queries, itemsize: _state_bytes(cfg), {
    "triton": DecodeImpl("triton", _triton_step, "ours: fused Triton one-token delta-rule update and readout",
                         needs_cuda=True, unsupported=_step_unsupported),
    "fla": DecodeImpl("fla", _fla_step, "flash-linear-attention fused_recurrent_delta_rule (Triton)", needs_cuda=True,
                      missing=fla_missing("delta_rule"), unsupported=lambda cfg, queries, device, dtype: state_decode.why_no_fla_step(cfg, queries)),
    "torch": DecodeImpl("torch", _torch_step, "plain torch one-token step (models/state_decode.py)", unsupported=_step_unsupported),
}, layer_cache=state_decode.DeltaNetCache)

MECHANISM = Mechanism(
    name="deltanet",
    description="delta-rule linear attention: the state is corrected towards each key's value (Yang et al. 2024)",
    family="linear",
    layer=lambda cfg: DeltaNetAttention(cfg, IMPLS),
    impls=IMPLS,
    flops=deltanet_flops,
    backward_factor=MATMUL_BACKWARD,  # its backward is the gradients of its chunked WY matmuls and triangular solve (nothing recomputed)
    refuses={"alibi": "deltanet's delta-rule state has no score matrix to bias (ALiBi needs scores before a softmax)"},
    bidirectional=False,
    params={"chunk": (DEFAULT_CHUNK, "tokens per chunk of the WY form")},
    decode=DECODE,
)
