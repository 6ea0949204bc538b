"""ExpoSB attention: RoPE with a decaying modulation, a learnable band filter over the head
dimension and a multiplicative distance decay: a prepass that forms q', k' once per row, then
flash-attention kernels over them.

Layout: q [B, T, Hq, D], k/v [B, S, Hkv, D] (any strides), o [B, T, Hq, D]; Hq % Hkv == 0.
Positions: keys n = 0 .. S-1, query i at m = i + S - T (S >= T; self-attention: m = i).

Math, per query head h (every parameter is a float32 [Hq] tensor, one value per query head;
with GQA, k' for query head h is its kv head's k transformed with head h's parameters):

    R_p x          rotate-half RoPE rotation at position p: angle of pair i is p * 10000^(-2i/D)
    r_p            = 1 + alpha * exp(-lam * p)                      (modulation of the rotation)
    band_j         = exp(-(j - mu)^2 / (2 sigma^2)),  f_j = beta + gamma * band_j
    q'_m           = f * r_m * R_m q_m,   k'_n = f * r_n * R_n k_n   (elementwise f over j)
    w_mn           = exp(-delta * |m - n|)
    s_mn           = (q'_m . k'_n) * w_mn / sqrt(D);   P = softmax_n(s) over visible keys;   o = P v

Prepass (exposb_prepass.py): k' [B, S, Hq, D] is formed once per row, in float32 from k and
cos/sin tables, and rounded once to k's dtype; k' is per query head (its kv head's k with that
head's parameters), so with GQA it is Hq / Hkv times k's size. The forward forms q' [B, T, Hq, D]
the same way, once per row of its query block (no pass of its own over q), and writes it out when
a gradient is needed; q', k' are then kept for the backward, beside the raw q, k.

Forward (flash skeleton): each program owns BLOCK_M query rows of one query head, its q' tile in
registers, and streams k', v tiles (through TMA descriptors on Hopper, else pointer loads): the
standard flash loop (online softmax in base 2, the LSE saved). Nothing of the T x S scores
reaches memory. A key tile lies in one of three regimes: BELOW (every key n <= every query m),
DIAGONAL (it straddles the diagonal), ABOVE (every n > m; bidirectional only). Off the diagonal
the distance splits at a pivot p between the two blocks (the query block's first position BELOW,
its last ABOVE), |m - n| = |m - p| + |p - n|, so
    w_mn / sqrt(D) = a_m * b_n,   a_m = exp(-delta |m - p|) / sqrt(D),   b_n = exp(-delta |p - n|)
(a <= 1/sqrt(D), b <= 1: neither overflows). The query factor a [BLOCK_M] is formed once per
regime (log2(e) folded in), the key factor b [BLOCK_N] once per tile, and with t = (q'.k') * b
(one multiply per score) the loop is the standard one with a in the softmax scale's place:
    m_i = max(m_i, a_m * max_n t_mn),   p_mn = exp2(t_mn * a_m - m_i)   (one FMA, as exp2(s * scale - m))
a is floored at 2^-126 (a masked t is -inf, and -inf * 0 would be NaN; the floor moves only scores
below 1e-38 |q'.k'|). Tiles that straddle the diagonal pay an exp per score (w whole, a = 1).
Masks: of BELOW and ABOVE only the one key tile that kv_len cuts is masked (split off as the
standard kernel's edge tiles are); DIAGONAL tiles are masked throughout.

Backward (FA2): D_m = rowsum(dO_m * O_m), O kept in float32 by the forward when a gradient
is needed (see _ExpoSBAttention.forward); P recomputed from the LSE;
    dP = dO V^T,   dS = P * (dP - D_m)                   (dL/ds)
    dV = P^T dO
    dX = dS * w / sqrt(D)                                (dL/d(q'.k'), through the decay)
    dq' = dX k',   dk' = dX^T q'                         (dk' per query head of a kv head)
    d delta = sum_mn dS_mn * s_mn * (-|m - n|)
Off the diagonal the backward factors w as the forward does, around the block a program owns. dq
(queries owned, the forward's pivot) accumulates sum_n (dS * b_n) k'_n over a regime's tiles and
multiplies by a_m once after it; d delta there, with x = dS * t (= X / a_m, X = dS * s):
    sum_n X_mn |m - n| = a_m * (|m - p| * sum_n x_mn + sum_n x_mn |p - n|)
(two row sums per tile, no distance per score; the diagonal keeps the per-score form). dk/dv (keys
owned: the pivot is the key block's last key BELOW, its first ABOVE, so the key factor is the fixed
one) accumulates sum_m (dS * a_m) q'_m and multiplies by b_n once per regime.
The loops accumulate dq', dk' in float32 as [rows, D] tiles; the epilogues split them into their
rotate-half pairs (dq'_1, dq'_2 [rows, D/2]: the rotation is then elementwise on the halves) and
go back through q' = f * r * R q, once per row, from the raw q's R q and r (the same for k with n):
    dq_m       = r_m * R_m^T (f * dq'_m)                  (R^T on halves: g1 c + g2 s, g2 c - g1 s)
    dr_m       = sum_j dq'_mj * f_j * (R_m q_m)_j
    d alpha    = sum_m dr_m * exp(-lam m),   d lam = sum_m dr_m * alpha * exp(-lam m) * (-m)
    df_j       = sum_m dq'_mj * r_m * (R_m q_m)_j
    d beta     = sum_j df_j,                 d gamma = sum_j df_j * band_j
    d mu       = sum_j df_j * gamma * band_j * (j - mu) / sigma^2
    d sigma    = sum_j df_j * gamma * band_j * (j - mu)^2 / sigma^3
Every program writes its partial sums of the seven parameter gradients to a small
[7, B, blocks, Hq] buffer; torch sums it (a cheap epilogue).

Kernels: the prepass (one program per row block and query head, for q and for k); the forward
(one per query block and query head); dq (one per query block and query head, also d delta) and
dk/dv (one per key block and kv head: each query head has its own k' and its own P, so dk' is
per query head; the program loops over the kv head's group, turns each head's dk' into its share
of dk in the epilogue and sums the shares and dv = sum_h P_h^T dO_h in float32 registers).

Files: exposb_tiles.py (the @triton.jit helpers), exposb_prepass.py (q', k'), exposb_fwd.py and
exposb_bwd.py (the attention kernels), exposb_launch.py (tiles and launches); here the autograd
Function and the public function.
"""

from __future__ import annotations

import torch

from attnbench.kernels.exposb_launch import PARAM_NAMES, check_inputs, exposb_backward, exposb_forward, exposb_transform


class _ExpoSBAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, seq_lens, *param_values):
        """Keeps O in float32 for the backward's D_m = rowsum(dO * O): from the rounded O, D_m's
        error is the same for every score of a row, and the parameter gradients, which sum over
        every score, add it up (1.4-3.6x torch's own fp16 error in five of the seven; < 0.7x
        with the float32 O, tests/kernels/test_exposb_kernel.py)."""
        params = dict(zip(PARAM_NAMES, param_values))
        k_t = exposb_transform(k, q.shape[2], 0, params)
        o, lse, q_t = exposb_forward(q, k_t, v, params, causal, seq_lens, torch.float32, keep_q_t=True)
        # q', k' kept (formed once); the raw q, k too: the parameter gradients need R q, R k
        ctx.save_for_backward(q, k, q_t, k_t, v, o, lse, *param_values)
        ctx.causal, ctx.seq_lens = causal, seq_lens
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, q_t, k_t, v, o, lse, *param_values = ctx.saved_tensors
        params = dict(zip(PARAM_NAMES, param_values))
        dq, dk, dv, d_params = exposb_backward(q, k, q_t, k_t, v, o, lse, do, params, ctx.causal, ctx.seq_lens)
        return dq, dk, dv, None, None, *d_params.unbind(0)


def exposb_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lam: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    delta: torch.Tensor,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """ExpoSB attention (module docstring), differentiable in q, k, v and all seven parameters.

    q [B, T, Hq, D], k/v [B, S, Hkv, D] (S >= T, any strides), fp16/bf16/fp32; D a power of two in [32, 256].
    lam (> 0), alpha, beta, gamma, mu, sigma (> 0), delta (>= 0): the constrained values,
    float32 [Hq], one per query head (the layer maps its raw parameters to them).
    causal: query m sees keys n <= m; seq_lens [B]: keys n >= seq_lens[b] are padding
    (a query that sees no key gets zeros). Returns o [B, T, Hq, D] in q's dtype.
    """
    params = dict(lam=lam, alpha=alpha, beta=beta, gamma=gamma, mu=mu, sigma=sigma, delta=delta)
    check_inputs(q, k, v, params)
    if seq_lens is not None:
        seq_lens = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    values = [params[name].to(device=q.device, dtype=torch.float32).contiguous() for name in PARAM_NAMES]
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *params.values()))):
        params = dict(zip(PARAM_NAMES, values))
        k_t = exposb_transform(k, q.shape[2], 0, params)
        return exposb_forward(q, k_t, v, params, causal, seq_lens, q.dtype)[0]  # inference: O straight in q's dtype, q' not kept
    return _ExpoSBAttention.apply(q, k, v, causal, seq_lens, *values)
