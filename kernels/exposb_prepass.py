"""ExpoSB's prepass (@triton.jit): q' and k' formed once per row, before the forward, so the
attention loops read them as plain tiles (forming k' in the loops redid every key tile's
transform for each query block that read it: O(T S / BLOCK_M) transforms where this does O(S)).
kernels/exposb.py has the math, exposb_launch.py the launcher."""

import triton
import triton.language as tl

from attnbench.kernels.exposb_tiles import head_params, load_transformed, store_rows


@triton.jit
def exposb_prepass_kernel(
    X, Y, COS, SIN, LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_yb, stride_yt, stride_yh, stride_yd,
    H, GROUP, L, shift,
    D: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK), B * Hq): y [B, L, Hq, D] = f * r * R x with query head h's parameters,
    x [B, L, Hq / GROUP, D] read at head h // GROUP (GROUP 1 for q; Hq / Hkv for k, whose k' is per
    query head), row t at position t + shift. Computed in float32, rounded once to y's dtype."""
    HALF: tl.constexpr = D // 2
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    lam, alpha, _, _, _, _, f1, f2, _, _ = head_params(LAM, ALPHA, BETA, GAMMA, MU, SIGMA, DELTA, h, HALF)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x_base = X + b * stride_xb + (h // GROUP) * stride_xh
    y1, y2, _, _, _ = load_transformed(x_base, stride_xt, stride_xd, rows, rows + shift, L, COS, SIN, lam, alpha, f1, f2, HALF)
    store_rows(Y + b * stride_yb + h * stride_yh, stride_yt, stride_yd, rows, (rows < L)[:, None], y1, y2, HALF)
