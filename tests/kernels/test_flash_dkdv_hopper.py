"""Which backwards take the Gluon dk/dv kernel (kernels/flash_dkdv_hopper.py) and which the portable one, with
the reason; its numbers are tested at real sizes in test_flash.py (test_the_hopper_dkdv_matches_at_real_sizes)."""

import pytest
import torch

from attnbench.kernels import flash_dkdv_hopper, flash_fwd_hopper
from attnbench.kernels.flash import flash_problem
from attnbench.kernels.flash_dkdv_hopper import hopper_dkdv_route

HOPPER = (9, 0)


def _tensors(t=256, heads=4, kv_heads=None, head_dim=64):
    generator = torch.Generator().manual_seed(0)
    q, do = (torch.randn(2, t, heads, head_dim, generator=generator).to(torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(2, t, kv_heads or heads, head_dim, generator=generator).to(torch.bfloat16) for _ in range(2))
    return q, k, v, do, torch.empty_like(k), torch.empty_like(v)


def test_it_is_off_until_timed():
    q, k, v, do, dk, dv = _tensors()
    assert "HOPPER_DKDV is off" in hopper_dkdv_route(flash_problem(q, k, causal=True), q, k, v, do, dk, dv, HOPPER)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_switched_on_it_takes_the_plain_problems_at_any_length(head_dim, causal, monkeypatch):
    monkeypatch.setattr(flash_dkdv_hopper, "HOPPER_DKDV", True)
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.plans(16384))  # the forward's length plans do not bind it
    q, k, v, do, dk, dv = _tensors(head_dim=head_dim, kv_heads=2)
    assert hopper_dkdv_route(flash_problem(q, k, causal=causal), q, k, v, do, dk, dv, HOPPER) is None


def test_switched_on_it_names_what_stays_portable(monkeypatch):
    monkeypatch.setattr(flash_dkdv_hopper, "HOPPER_DKDV", True)
    q, k, v, do, dk, dv = _tensors()
    assert "RoPE" in hopper_dkdv_route(flash_problem(q, k, causal=True, theta=1e4), q, k, v, do, dk, dv, HOPPER)
    lens = torch.tensor([200, 256])
    assert "key padding" in hopper_dkdv_route(flash_problem(q, k, seq_lens=lens), q, k, v, do, dk, dv, HOPPER)
    assert "not a Hopper GPU" in hopper_dkdv_route(flash_problem(q, k), q, k, v, do, dk, dv, (8, 0))
    strided = torch.randn(2, 256, 8, 64).to(torch.bfloat16)[:, :, ::2]
    assert "dO's strides" in hopper_dkdv_route(flash_problem(q, k), q, k, v, strided, dk, dv, HOPPER)


@pytest.mark.parametrize("tile", flash_dkdv_hopper.TILES)
def test_a_program_takes_its_tiles_keys_with_a_warpgroup_per_64(tile):
    q, k, v, do, dk, dv = _tensors(t=1000, kv_heads=2)
    stats = torch.zeros(2, 4, 1000)
    grid, args, constexprs, options = flash_dkdv_hopper.launch_arguments(q, k, v, do, dk, dv, stats, stats, flash_problem(q, k), tile)
    assert grid == (-(-1000 // tile.keys), 2 * 2) and options["num_warps"] == tile.keys // 16
    assert args[1].block_shape == args[2].block_shape == [tile.keys, 64], "k and v blocks of the program's keys"
    assert args[0].block_shape == args[3].block_shape == [flash_dkdv_hopper.BLOCK_M, 64], "q and dO tiles alike either way"
    assert (constexprs["STAGES"], constexprs["PIPELINED"]) == (tile.stages, tile.pipelined)


def test_other_key_counts_are_refused():
    q, k, v, do, dk, dv = _tensors()
    stats = torch.zeros(2, 4, 256)
    with pytest.raises(ValueError, match="64 or 128"):
        flash_dkdv_hopper.launch_arguments(q, k, v, do, dk, dv, stats, stats, flash_problem(q, k), flash_dkdv_hopper.DkdvTile(96, 2, False))
