"""linear: linear attention (Katharopoulos et al. 2020, "Transformers are RNNs") with the
feature map phi(x) = elu(x) + 1 on queries and keys, normalised:

    o_i = sum_j phi(q_i) . phi(k_j) v_j / (sum_j phi(q_i) . phi(k_j) + 1e-6)     (causal: j <= i)

Bidirectional by one K^T V state, causal by chunked prefix sums (models/feature_attention.py).
No softmax, no position information: the model adds absolute positions (or the layer
rotates q and k by RoPE before the feature map); no scores, so no ALiBi.
"""

from __future__ import annotations

import torch

from attnbench.models import feature_attention
from attnbench.models.fla import fla_missing
from attnbench.models.qkv import qkv_layer
from attnbench.models.registry import MATMUL_BACKWARD, Impl, LayerConfig, Mechanism

DEFAULT_CHUNK = 64


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, elementwise on [B, T, H, D], as x + 1 (x > 0) and exp(x) (x <= 0):
    ``F.elu(x) + 1`` computes exp(x) - 1 + 1, which cancels to 0 for x below -5 in bf16 (-17 in
    fp32); a query whose features all vanish then had a zero normaliser (GPT small diverged)."""
    return torch.exp(x.clamp(max=0)) + x.clamp(min=0)


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
)
