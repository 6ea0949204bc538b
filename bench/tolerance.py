"""Error bounds for an implementation against its exact (float64) reference: the one rule that
`attnbench check` and the test suite share.

Low precision follows FlashAttention's tests: at most 2x plain torch's own error in the same
precision. float32 gets a relative bound. Both add the dtype's rounding floor, so a bound never
becomes 0 where the exact answer is 0 (the query gradient with a single key, for example).
"""

from __future__ import annotations

import torch

FP32_NOISE = 1e-6  # float32 accumulation noise, relative to max(1, |reference|)


def rounding_floor(magnitude: float, dtype: torch.dtype) -> float:
    """What rounding alone may cost at the largest reference value ``magnitude``: half an ulp of
    ``dtype`` there plus float32 accumulation noise (absolute below 1, relative above)."""
    return torch.finfo(dtype).eps * magnitude / 2 + FP32_NOISE * max(1.0, magnitude)


def error_bound(torch_error: float, magnitude: float, dtype: torch.dtype) -> float:
    """Low precision: 2x torch's own error in ``dtype`` plus the rounding floor."""
    return 2 * torch_error + rounding_floor(magnitude, dtype)


def relative_bound(relative: float, magnitude: float, dtype: torch.dtype = torch.float32) -> float:
    """``relative`` x the largest reference value plus the rounding floor (float32 comparisons)."""
    return relative * magnitude + rounding_floor(magnitude, dtype)
