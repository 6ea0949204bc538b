"""FlashKernel (kernels/flash_tiles.py): the autotuner chooses a config once per key, later
launches skip it and run that config, a new key goes back to it, and a forced tile runs and is
undone. Outputs are checked against the reference on every path."""

import pytest
import torch

from attnbench.kernels.flash import flash_attention
from attnbench.kernels.flash_fwd import flash_fwd_kernel
from attnbench.kernels.flash_tiles import tile_config
from attnbench.kernels.reference import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def autotuner_calls(monkeypatch):
    """The launches that went through triton's Autotuner.run of the forward kernel, by causal."""
    calls = []
    tuner = flash_fwd_kernel.autotuner
    run = tuner.run

    def counted(*args, **kwargs):
        calls.append(kwargs["CAUSAL"])
        return run(*args, **kwargs)

    monkeypatch.setattr(tuner, "run", counted)
    monkeypatch.setattr(flash_fwd_kernel, "chosen", {})
    return calls


def test_only_a_new_key_goes_through_the_autotuner(autotuner_calls):
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEVICE) for _ in range(3))
    for causal in (True, True, False, True, False):
        torch.testing.assert_close(flash_attention(q, k, v, causal=causal), attention(q, k, v, causal=causal), atol=1e-4, rtol=1e-4)
    assert autotuner_calls == [True, False]
    assert sorted(dict(key[1:])["CAUSAL"] for key in flash_fwd_kernel.chosen) == [False, True]


def test_the_key_holds_every_launch_keyword(autotuner_calls):
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEVICE) for _ in range(3))
    flash_attention(q, k, v, causal=True)
    (key,) = flash_fwd_kernel.chosen
    assert key[0] == torch.float32 and dict(key[1:])["CAUSAL"] is True
    assert [name for name, _ in key[1:]] == ["SEQ_BUCKET", "HEAD_DIM", "PART", "D_PAD", "CAUSAL", "ROPE", "ALIBI", "HAS_SEQ_LENS", "PRECISION"]


def test_forced_tile_runs_that_tile_and_is_undone(autotuner_calls):
    q, k, v = (torch.randn(1, 48, 2, 16, device=DEVICE) for _ in range(3))
    flash_attention(q, k, v, causal=True)
    chosen, configs = dict(flash_fwd_kernel.chosen), flash_fwd_kernel.autotuner.configs
    tile = tile_config(16, 16, 4, 1)
    with flash_fwd_kernel.forced(tile):
        out = flash_attention(q, k, v, causal=True)
        assert flash_fwd_kernel.autotuner.configs == [tile]
        assert list(flash_fwd_kernel.chosen.values()) == [tile]
    assert flash_fwd_kernel.chosen == chosen and flash_fwd_kernel.autotuner.configs is configs
    torch.testing.assert_close(out, attention(q, k, v, causal=True), atol=1e-4, rtol=1e-4)
