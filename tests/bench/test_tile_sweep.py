"""The tile sweep: a forced tile really runs (and the kernel stays correct with it), the
autotuner's lists come back afterwards, and on a GPU the sweep writes one row per tile."""

import pytest
import torch

from attnbench.kernels.flash import flash_attention
from attnbench.kernels.flash_fwd import flash_fwd_kernel
from attnbench.kernels.flash_tiles import tile_config
from attnbench.kernels.reference import attention
from attnbench.tile_sweep import forced_tile, sweep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_forced_tile_runs_that_tile_and_restores_the_list():
    configs, cache = flash_fwd_kernel.configs, flash_fwd_kernel.cache
    q, k, v = (torch.randn(1, 48, 2, 16, device=DEVICE) for _ in range(3))
    tile = tile_config(16, 16, 4, 1)
    with forced_tile(flash_fwd_kernel, tile):
        out = flash_attention(q, k, v, causal=True)
        assert flash_fwd_kernel.configs == [tile]
        assert flash_fwd_kernel.best_config.kwargs == {"BLOCK_M": 16, "BLOCK_N": 16}
    assert flash_fwd_kernel.configs is configs and flash_fwd_kernel.cache is cache
    torch.testing.assert_close(out, attention(q, k, v, causal=True), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_sweep_times_every_candidate_and_cudnn():
    candidates = {"fwd": [(64, 64, 4, 2)], "dkdv": [(32, 64, 4, 2), (64, 64, 4, 2)], "dq": [(64, 64, 4, 2)]}
    rows = sweep(batch=2, seq=256, heads=2, head_dim=64, candidates=candidates)
    assert rows["kernel"].tolist() == ["fwd", "dkdv", "dkdv", "dq", "cudnn-fwd", "cudnn-bwd"]
    assert (rows["ms"] > 0).all()
