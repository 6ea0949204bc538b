"""Which forwards take the warp-specialised Hopper kernel (kernels/flash_fwd_hopper.py) and which the
portable one, with the reason; the Hopper kernel's numbers are tested at real sizes in test_flash.py
(its REAL_SIZE_CASES named hopper-*, on a Hopper GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnbench.kernels import flash_fwd_hopper
from attnbench.kernels.flash import flash_problem
from attnbench.kernels.flash_fwd_hopper import hopper_route
from attnbench.kernels.reference import alibi_slopes

HOPPER = (9, 0)
MEASURED_PLANS = dict(flash_fwd_hopper.PLANS)  # the default, before the fixture replaces it


@pytest.fixture(autouse=True)
def hopper_forward_everywhere(monkeypatch):
    """The routes as they are where the Hopper forward is on at every head dim and length (by default it is
    on where it was measured faster: test_the_measured_policy_names_why_the_rest_stays_portable)."""
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.EVERYWHERE)


def _qkv(t=256, s=None, heads=4, kv_heads=None, head_dim=64, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, t, heads, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(2, s or t, kv_heads or heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", flash_fwd_hopper.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_options_the_hopper_kernel_has_take_it(causal, head_dim, dtype):
    q, k, v = _qkv(head_dim=head_dim, dtype=dtype)
    assert hopper_route(flash_problem(q, k, causal=causal), q, k, v, HOPPER) is None
    q, k, v = _qkv(t=100, s=300, heads=8, kv_heads=2, head_dim=head_dim, dtype=dtype)  # GQA, S > T
    assert hopper_route(flash_problem(q, k, causal=causal, theta=1e4), q, k, v, HOPPER) is None  # RoPE: rotated before


def test_a_fused_projection_takes_it():
    qkv = torch.randn(2, 128, 3 * 4, 64).to(torch.bfloat16)
    q, k, v = qkv.split(4, dim=2)
    assert hopper_route(flash_problem(q, k, causal=True), q, k, v, HOPPER) is None


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(capability=(8, 0)), "not a Hopper GPU"),
        (dict(capability=(10, 0)), "not a Hopper GPU"),
        (dict(dtype=torch.float32), "float32"),
        (dict(head_dim=96), "head dim 96"),
        (dict(head_dim=256), "head dim 256"),
        (dict(options=dict(seq_lens=torch.tensor([200, 256]))), "key padding"),
        (dict(options=dict(slopes=alibi_slopes(4))), "ALiBi"),
        (dict(options=dict(window=(64, 0), causal=True)), "a window"),
        (dict(options=dict(window=(64, 64))), "a window"),
        (dict(t=300, s=200), "more queries than keys"),
        (dict(transpose=True), "q's strides"),
    ],
)
def test_every_other_option_takes_the_portable_kernel_with_a_reason(change, reason):
    q, k, v = _qkv(t=change.get("t", 256), s=change.get("s"), head_dim=change.get("head_dim", 64), dtype=change.get("dtype", torch.bfloat16))
    if change.get("transpose"):  # [B, H, T, D] storage seen as [B, T, H, D]
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    route = hopper_route(flash_problem(q, k, **change.get("options", {})), q, k, v, change.get("capability", HOPPER))
    assert route is not None and reason in route


def test_packed_and_block_sparse_problems_take_the_portable_kernel():
    q, k, v = _qkv()
    problem = flash_problem(q, k)
    for field, value, reason in (("cu_seqlens", torch.tensor([0, 256], dtype=torch.int32), "packed"), ("sparse_block", 64, "block-sparse")):
        route = hopper_route(dataclasses.replace(problem, **{field: value}), q, k, v, HOPPER)
        assert route is not None and reason in route


def test_switched_off_and_cpu_tensors_take_the_portable_kernel(monkeypatch):
    q, k, v = _qkv()
    problem = flash_problem(q, k)
    assert "not on a GPU" in hopper_route(problem, q, k, v)
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.NOWHERE)
    assert "off at head dim 64, bidirectional" in hopper_route(problem, q, k, v, HOPPER)


def test_the_measured_policy_names_why_the_rest_stays_portable(monkeypatch):
    """From 512 keys at every head dim and mask (PERF_NOTES 21-23)."""
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", MEASURED_PLANS)
    for head_dim in flash_fwd_hopper.HEAD_DIMS:
        for causal in (False, True):
            for s, reason in ((511, "511 keys (the Hopper path is on from 512"), (512, None)):
                q, k, v = _qkv(t=256, s=s, heads=2, head_dim=head_dim)
                route = hopper_route(flash_problem(q, k, causal=causal), q, k, v, HOPPER)
                assert route is None if reason is None else reason in route, (head_dim, causal, s, route)


def test_each_plan_is_on_until_the_next_ones_length(monkeypatch):
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", MEASURED_PLANS)
    first, paired_3 = MEASURED_PLANS[64, True]
    assert flash_fwd_hopper.plan_for(64, True, 511) is None
    assert flash_fwd_hopper.plan_for(64, True, 512) == flash_fwd_hopper.plan_for(64, True, 4095) == first
    assert flash_fwd_hopper.plan_for(64, True, 4096) == flash_fwd_hopper.plan_for(64, True, 1 << 20) == paired_3
    paired, per_item = MEASURED_PLANS[128, True]
    assert flash_fwd_hopper.plan_for(128, True, 16383) == paired and flash_fwd_hopper.plan_for(128, True, 16384) == per_item


def test_each_plan_takes_one_of_its_head_dims_tiles_in_order_of_length():
    for (head_dim, _), taken in MEASURED_PLANS.items():
        assert taken and all(plan.tile in flash_fwd_hopper.TILES[head_dim] for plan in taken)
        assert [plan.from_keys for plan in taken] == sorted({plan.from_keys for plan in taken})
    assert set(MEASURED_PLANS) == {(d, causal) for d in flash_fwd_hopper.HEAD_DIMS for causal in (False, True)}


def test_the_sweeps_plans_change_every_plan_and_the_first_ones_length():
    tile = flash_fwd_hopper.TILES[64][0]
    changed = flash_fwd_hopper.plans(0, tile, persistent=False, paired=False)
    for key, taken in changed.items():
        assert [plan.from_keys for plan in taken] == [0] + [plan.from_keys for plan in MEASURED_PLANS[key][1:]]
        assert all(not plan.persistent and not plan.paired for plan in taken)
        assert all(plan.tile == (tile if key[0] == 64 else MEASURED_PLANS[key][i].tile) for i, plan in enumerate(taken))
    assert all(taken == () for taken in flash_fwd_hopper.plans(None).values())
