"""linear: linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") with the
feature map phi(x) = elu(x) + 1 on queries and keys, normalised:

    o_i = sum_j phi(q_i) . phi(k_j) v_j / (sum_j phi(q_i) . phi(k_j) + 1e-6)     (causal: j <= i)

Bidirectional by one K^T V state, causal by chunked prefix sums (models/feature_attention.py).
No softmax, no position information: the model adds absolute positions (or the layer
rotates q and k by RoPE before the feature map); no scores, so no ALiBi.
"""

from __future__ import annotations

import torch

from attnbench.kernels import decode_cost
from attnbench.models import feature_attention, state_decode
from attnbench.models.feature_attention import elu_plus_one as feature_map
from attnbench.models.fla import fla_missing
from attnbench.models.qkv import qkv_layer
from attnbench.models.registry import MATMUL_BACKWARD, DecodeForm, DecodeImpl, Impl, LayerConfig, Mechanism

DEFAULT_CHUNK = 64


def torch_reference(q, k, v, *, causal=False, seq_lens=None, chunk=DEFAULT_CHUNK):
    """The definition, with the T x T weight matrix; q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]."""
    return feature_attention.quadratic(feature_map(q), feature_map(k), v, causal=causal, seq_lens=seq_lens)


def chunked(q, k, v, *, causal=False, seq_lens=None, chunk=DEFAULT_CHUNK):
    """Linear cost: K^T V state (bidirectional) or per-chunk prefix sums (causal)."""
    return feature_attention.chunked(feature_map(q), feature_map(k), v, causal=causal, seq_lens=seq_lens, chunk=chunk)


def fla_chunk(q, k, v, *, causal=True, seq_lens=None, chunk=DEFAULT_CHUNK):
    """flash-linear-attention's chunk_linear_attn (causal, normalised) on the same features.

    fla has no key padding or GQA: padded keys get zero features (exactly what the reference
    does) and k/v heads are repeated to Hq.
    """
    from fla.ops.linear_attn import chunk_linear_attn

    if not causal:
        raise ValueError("fla's chunk_linear_attn is causal only")
    fq, fk = feature_map(q), feature_map(k)
    keep = feature_attention.key_padding(k.shape[1], seq_lens, k.device)
    if keep is not None:
        fk = fk * keep
    group = q.shape[2] // k.shape[2]
    fk, v = fk.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    # normalised, so the scale cancels between numerator and denominator
    o, _ = chunk_linear_attn(fq.contiguous(), fk.contiguous(), v.contiguous(), scale=1.0, normalize=True)
    return o


def _fla_unsupported(cfg: LayerConfig, device, dtype) -> str | None:
    return None if cfg.causal else "fla's chunk_linear_attn is causal only"


def linear_options(cfg: LayerConfig) -> dict:
    return {"chunk": int(cfg.options.get("chunk", DEFAULT_CHUNK))}


def linear_flops(cfg: LayerConfig, batch: int, seq: int, seq_lens=None) -> float:
    """Chunked form, per head and token (feature maps and normalisation not counted):
    causal: 2*D*D (its k v^T into the chunk state) + 2*D*D (q times the running state)
            + 2*C*D + 2*C*D (q k^T and P v within its chunk of C tokens, full tile);
    bidirectional: 2*D*D (k v^T into the one state) + 2*D*D (q times it)."""
    d, tokens = cfg.head_dim, batch * seq
    per_token = 4.0 * d * d
    if cfg.causal:
        per_token += 4.0 * int(cfg.options.get("chunk", DEFAULT_CHUNK)) * d
    return cfg.heads * tokens * per_token


IMPLS = {
    "torch": Impl("torch", torch_reference, "plain torch by definition (T x T weights in memory)"),
    "chunked": Impl("chunked", chunked, "torch, linear cost: K^T V state / chunked prefix sums"),
    "fla": Impl(
        "fla", fla_chunk, "flash-linear-attention chunk_linear_attn (Triton)",
        needs_cuda=True, missing=fla_missing("linear_attn"), unsupported=_fla_unsupported,
    ),
}

def _step_inputs(cfg: LayerConfig, batch: int, device, dtype):
    """One token q [B, Hq, D], k/v [B, Hkv, D] and a random state (float32 kv [B, Hkv, D, D],
    k_sum [B, Hkv, D] > 0): what the state holds after L tokens does not change the step's work."""
    q = torch.randn(batch, cfg.heads, cfg.head_dim, device=device).to(dtype)  # drawn in float32: one seed, the same token in every dtype
    k, v = (torch.randn(batch, cfg.kv_heads, cfg.head_dim, device=device).to(dtype) for _ in range(2))
    kv = 0.01 * torch.randn(batch, cfg.kv_heads, cfg.head_dim, cfg.head_dim, device=device)
    k_sum = torch.rand(batch, cfg.kv_heads, cfg.head_dim, device=device) + 1.0
    return q, k, v, kv, k_sum


def _torch_step(cfg, batch, context, queries, device, dtype):
    q, k, v, kv, k_sum = _step_inputs(cfg, batch, device, dtype)
    state = state_decode.LinearState(kv, k_sum)
    return lambda: state_decode.linear_step(q, k, v, state)[0]


def _triton_step(cfg, batch, context, queries, device, dtype):
    from attnbench.kernels.state_decode import linear_step

    q, k, v, kv, k_sum = _step_inputs(cfg, batch, device, dtype)
    return lambda: linear_step(q, k, v, kv, k_sum)  # the state takes the token in place


def _fla_step(cfg, batch, context, queries, device, dtype):
    """fla's fused_recurrent_linear_attn over one token, normalised (its running key sum kept beside
    kv), the feature map applied to q and k in the step as ours fuses it; the new state comes back."""
    from fla.ops.linear_attn import fused_recurrent_linear_attn

    q, k, v, kv, k_sum = _step_inputs(cfg, batch, device, dtype)
    z = k_sum[:, None]  # (B, 1, H, D): fla's running key sum

    def step():
        fq, fk = feature_map(q[:, None]), feature_map(k[:, None])  # (B, 1, H, D)
        o, _ = fused_recurrent_linear_attn(fq, fk, v[:, None], scale=1.0, initial_state=(kv, z), output_final_state=True, normalize=True)
        return o

    return step


def _state_bytes(cfg: LayerConfig) -> int:
    return decode_cost.linear_state_bytes(cfg.kv_heads, cfg.head_dim, cfg.head_dim)


def _step_bytes(cfg: LayerConfig, batch: int, context: int, queries: int, itemsize: int) -> int:
    d = cfg.head_dim
    return decode_cost.state_step_bytes(batch, _state_bytes(cfg), cfg.heads, cfg.kv_heads, d, d, itemsize)


def _step_unsupported(cfg: LayerConfig, queries: int, device, dtype) -> str | None:
    return state_decode.why_no_step(cfg, queries)


DECODE = DecodeForm("state", _step_bytes, lambda cfg, context, queries, itemsize: _state_bytes(cfg), {
    "triton": DecodeImpl("triton", _triton_step, "ours: fused Triton one-token state update and readout",
                         needs_cuda=True, unsupported=_step_unsupported),
    "fla": DecodeImpl("fla", _fla_step, "flash-linear-attention fused_recurrent_linear_attn, normalised (Triton)", needs_cuda=True,
                      missing=fla_missing("linear_attn"), unsupported=lambda cfg, queries, device, dtype: state_decode.why_no_fla_step(cfg, queries)),
    "torch": DecodeImpl("torch", _torch_step, "plain torch one-token step (models/state_decode.py)", unsupported=_step_unsupported),
}, layer_cache=state_decode.LinearCache)

MECHANISM = Mechanism(
    name="linear",
    description="linear attention, phi = elu + 1, normalised (Katharopoulos et al. 2020)",
    family="linear",
    layer=qkv_layer(linear_options, IMPLS),
    impls=IMPLS,
    flops=linear_flops,
    backward_factor=MATMUL_BACKWARD,  # its backward is the gradients of its matmuls (states and chunk tiles kept or rebuilt by prefix sums, no scores to recompute)
    refuses={"alibi": "linear attention has no score matrix to bias (ALiBi needs scores before a softmax)"},
    params={"chunk": (DEFAULT_CHUNK, "tokens per chunk of the causal prefix-sum form")},
    decode=DECODE,
)
