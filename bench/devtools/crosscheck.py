"""An independent check of the harness: re-time a run's SDPA rows with nothing but
F.scaled_dot_product_attention under one backend and a bare ``triton.testing.do_bench``
(median), count FLOPs by hand (causal: T(T+1)/2 pairs), and print both TFLOP/s.

    python -m attnbench.devtools.crosscheck results/<run>      # on a CUDA machine

Shares no code with the sweep (no registry, no adapters, no FLOP model), so agreement
means the sweep's layout handling, timing and FLOP counting are right.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnbench.dtypes import DTYPES

BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


def plain_tflops(row: pd.Series) -> float:
    """TFLOP/s of the forward of F.sdpa on q, k, v [B, H, T, D] under the row's backend."""
    from triton.testing import do_bench

    b, t, h, d = int(row.batch), int(row.seq), int(row.heads), int(row.head_dim)
    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=DTYPES[row["dtype"]]) for _ in range(3))
    causal = str(row.causal) == "True"
    with sdpa_kernel(BACKENDS[row.impl]):
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), return_mode="median")
    pairs = t * (t + 1) // 2 if causal else t * t
    return 4 * b * h * d * pairs / (ms * 1e-3) / 1e12


def main(run: Path) -> None:
    rows = pd.read_csv(run / "speed.csv")
    rows = rows[(rows.status == "ok") & (rows.level == "kernel") & (rows["mode"] == "fwd") & rows.impl.isin(list(BACKENDS))]
    print(f"{'impl':16} {'causal':6} {'B':>3} {'T':>6} {'sweep TFLOP/s':>14} {'plain TFLOP/s':>14} {'ratio':>6}")
    for _, row in rows.iterrows():
        plain = plain_tflops(row)
        print(f"{row.impl:16} {str(row.causal):6} {row.batch:>3} {row.seq:>6} {row.tflops:>14.1f} {plain:>14.1f} {row.tflops / plain:>6.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
