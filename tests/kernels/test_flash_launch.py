"""FlashKernel (kernels/flash_launch.py): the autotuner chooses a config once per key, later
launches skip it and run that config, a new key goes back to it, and a forced tile runs and is
undone; on a GPU, a launch whose signature was seen calls the compiled kernel directly, a
tensor of another alignment is a new signature, and a launch hook (a profiler's) still sees
every launch; the Hopper forward's launches (flash_fwd_hopper._launch) likewise. Outputs are checked against
the reference on every path."""

import pytest
import torch
from triton import knobs

from attnbench.kernels import flash_fwd_hopper
from attnbench.kernels.flash import flash_attention, flash_problem
from attnbench.kernels.flash_bwd import flash_dkdv_kernel, flash_dq_kernel
from attnbench.kernels.flash_fwd import flash_fwd_kernel
from attnbench.kernels.flash_launch import _scratch, launch_signature, tile_config
from attnbench.kernels.flash_tiles import LEFT_EDGE, LENGTH_EDGE, RIGHT_EDGE
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
    assert [name for name, _ in key[1:]] == ["TMA", "SEQ_BUCKET", "HEAD_DIM", "D_PAD", "CAUSAL", "ALIBI", "HAS_SEQ_LENS", "EDGES", "PRECISION", "SPARSE_BLOCK", "VARLEN"]


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


def test_launch_signature_tells_alignment_dtype_and_scalar_values_apart():
    base = torch.zeros(40)
    aligned, shifted = base[:8], base[1:9]  # 4-byte offset: no longer 16-byte aligned

    def signature(tensor, size=3, causal=True):
        return launch_signature((tensor, base, size, 0.5), {"CAUSAL": causal}, tensors=2)

    assert signature(aligned) == signature(base[4:12])  # 16 bytes on: same
    assert signature(aligned) != signature(shifted)
    assert signature(aligned) != signature(aligned.half())
    assert signature(aligned) != signature(aligned, size=16)
    assert signature(aligned) != signature(aligned, causal=False)


@pytest.mark.cuda
def test_a_seen_signature_launches_the_compiled_kernel_directly(monkeypatch):
    q, k, v, do = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kernels = (flash_fwd_kernel, flash_dq_kernel, flash_dkdv_kernel)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "compiled", {})

    def output_and_grads(q):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = flash_attention(*leaves, causal=True)
        return (out, *torch.autograd.grad(out, leaves, do))

    first = output_and_grads(q)
    assert [len(kernel.compiled) for kernel in kernels] == [1, 1, 1]
    for kernel in kernels:
        monkeypatch.setattr(kernel.autotuner.fn, "run", lambda *a, **kw: pytest.fail("JITFunction.run on a seen signature"))
    again = output_and_grads(q)
    for mine, before in zip(again, first):  # the same kernels on the same inputs: bitwise equal
        torch.testing.assert_close(mine, before, atol=0, rtol=0)
    expected = attention(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(again[0].float(), expected, atol=2e-2, rtol=2e-2)
    launches = []
    knobs.runtime.launch_enter_hook.add(launches.append)  # a profiler's hook: launches go through triton's wrapper
    try:
        hooked = output_and_grads(q)
    finally:
        knobs.runtime.launch_enter_hook.remove(launches.append)
    assert len(launches) == 3, "the hook sees the forward, dq and dk/dv launches"
    for mine, before in zip(hooked, first):
        torch.testing.assert_close(mine, before, atol=0, rtol=0)

    monkeypatch.undo()
    storage = torch.randn(q.numel() + 1, device="cuda", dtype=torch.bfloat16)
    shifted = storage[1:].view_as(q).copy_(q)  # 2-byte offset: a new signature, compiled for it
    compiled = len(flash_fwd_kernel.compiled)
    torch.testing.assert_close(flash_attention(shifted, k, v, causal=True), first[0])
    assert len(flash_fwd_kernel.compiled) == compiled + 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="not a Hopper GPU")
def test_a_seen_hopper_launch_calls_the_compiled_kernel_directly(monkeypatch):
    monkeypatch.setattr(flash_fwd_hopper, "PLANS", flash_fwd_hopper.EVERYWHERE)
    monkeypatch.setattr(flash_fwd_hopper, "COMPILED", {})
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(3))
    first = flash_attention(q, k, v, causal=True)
    assert len(flash_fwd_hopper.COMPILED) == 1
    launches = []
    with monkeypatch.context() as patched:
        patched.setattr(flash_fwd_hopper.flash_fwd_hopper_kernel, "run", lambda *a, **kw: pytest.fail("JITFunction.run on a seen key"))
        again = flash_attention(q, k, v, causal=True)
        knobs.runtime.launch_enter_hook.add(launches.append)  # a profiler's hook: through triton's wrapper
        try:
            hooked = flash_attention(q, k, v, causal=True)
        finally:
            knobs.runtime.launch_enter_hook.remove(launches.append)
    assert len(launches) == 1
    for mine in (again, hooked):  # the same kernel on the same inputs: bitwise equal
        torch.testing.assert_close(mine, first, atol=0, rtol=0)
    torch.testing.assert_close(again.float(), attention(q.float(), k.float(), v.float(), causal=True), atol=2e-2, rtol=2e-2)
    q, k, v = (x[:, :700].contiguous() for x in (q, k, v))
    shorter = flash_attention(q, k, v, causal=True)  # another shape: a new key
    assert len(flash_fwd_hopper.COMPILED) == 2
    torch.testing.assert_close(shorter.float(), attention(q.float(), k.float(), v.float(), causal=True), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="TMA needs Hopper or newer")
def test_descriptor_scratch_is_one_buffer_per_stream(monkeypatch):
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(_scratch, "buffers", {})
    first = flash_attention(q, k, v, causal=True)
    second = flash_attention(q, k, v, causal=True)
    (buffer,) = _scratch.buffers.values()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        third = flash_attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert len(_scratch.buffers) == 2 and any(b is buffer for b in _scratch.buffers.values())
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    torch.testing.assert_close(third, first, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("options", "edges"),
    [
        ({"causal": True}, {"right"}),  # a key at or past S is past every valid query too
        ({}, {"length"}),
        ({"causal": True, "window": (64, 0)}, {"left", "right"}),
        ({"window": (64, 0)}, {"left", "right"}),
        ({"window": (64, 16)}, {"left", "right", "length"}),
        ({"causal": True, "seq_lens": torch.tensor([3])}, {"right", "length"}),
        ({"seq_lens": torch.tensor([3])}, {"length"}),
    ],
)
def test_masked_tiles_test_only_the_edges_the_problem_has(options, edges):
    """FlashProblem.edges, which masked tiles test (score_tile): fewer than needed would show
    keys that must stay hidden (the reference tests catch that); more cost instructions."""
    q = torch.zeros(1, 8, 1, 16)
    names = {"left": LEFT_EDGE.value, "right": RIGHT_EDGE.value, "length": LENGTH_EDGE.value}
    assert flash_problem(q, q, **options).edges == sum(names[edge] for edge in edges)
