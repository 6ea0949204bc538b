"""bench/devtools/hopper_sass.py: every plan of the Hopper forward compiles for sm_90a with the triton here
(so an API that a newer triton removed fails on the CPU, not on the GPU), and its consumers' tile loop keeps
the shape its speed depends on: one tile's exponentials, the masking branched around for the tiles that need
none."""

import pytest

from attnbench.devtools.compile_spills import _ptxas_usage
from attnbench.devtools.hopper_sass import compile_plan, tile_loop
from attnbench.kernels import flash_fwd_hopper

PLANS = [(d, causal, i) for (d, causal), taken in flash_fwd_hopper.PLANS.items() for i in range(len(taken))]


@pytest.mark.parametrize("head_dim, causal, index", PLANS, ids=[f"d{d}-{'causal' if c else 'bidirectional'}-{i}" for d, c, i in PLANS])
def test_each_plan_compiles_with_one_tiles_exponentials_and_the_masking_branched(head_dim, causal, index):
    plan = flash_fwd_hopper.PLANS[head_dim, causal][index]
    compiled = compile_plan(head_dim, causal, plan, seq=512)
    registers, _, _ = _ptxas_usage(compiled.asm["ptx"])
    assert 0 < registers <= plan.tile.max_registers
    per_thread = flash_fwd_hopper.ROWS_PER_CONSUMER * plan.tile.block_n // 128
    loop = tile_loop(compiled.asm["cubin"], per_thread)
    assert per_thread <= loop["mufu"] <= per_thread + 4, "a tile's exponentials and the rescale's, none issued twice"
    assert loop["branch_skips"] >= per_thread, "the masking (one select an element at least) is skipped by unmasked tiles"
