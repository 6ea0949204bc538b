"""What one attention call costs the host (CPU), apart from the GPU (CUDA only).

At a tiny shape every kernel finishes before the host has launched the next, so the wall
time per forward + backward is the host's: Python, argument binding, autograd, launches.
A model step at batch 16 x 1k tokens of GPT small is host-bound (results/reference-h100/
model: ~45% of it the GPU idles), so this cost, times layers, is the difference between
two impls whose kernels take the same GPU time.

    python3 -m attnbench.devtools.host_overhead --impl triton --impl sdpa --profile 20
    python3 -m attnbench.devtools.host_overhead --impl triton --impl sdpa --compiled   # also torch.compile'd

Eager, our kernels run through an autograd.Function; compiled (fullgraph), through the custom
ops attnbench::flash_fwd / flash_bwd (kernels/flash.py), so --compiled times that path too.
"""


from __future__ import annotations

import cProfile
import pstats
import time
from typing import Annotated

import torch
import typer

from attnbench.models import registry


ENQUEUE_CALLS = 40  # few enough that CUDA's launch queue (about a thousand launches) never fills and blocks the host


def host_us_per_call(run, calls: int, batch: int, seq: int, heads: int, head_dim: int) -> tuple[float, float]:
    """(wall, host) microseconds per forward + backward of ``run`` (a kernel-level core, called as
    run(q, k, v, causal=True)) on q, k, v [batch, seq, heads, head_dim] bf16, after a warm-up that
    compiles: wall over ``calls`` calls synchronised once at the end; host, the time to issue one, over
    ENQUEUE_CALLS calls issued onto an idle GPU with no synchronisation among them. Equal: the host is what
    the GPU waits on; wall above host: the GPU's own time shows (the shape is not tiny enough)."""
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def step() -> None:
        run(q, k, v, causal=True).backward(grad)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ENQUEUE_CALLS):
        step()
    host = (time.perf_counter() - start) / ENQUEUE_CALLS * 1e6
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6, host


def main(
    impl: Annotated[list[str], typer.Option(help="impl of --attn (repeat the option for several)")] = ["triton", "sdpa"],  # noqa: B006
    attn: Annotated[str, typer.Option(help="mechanism")] = "standard",
    calls: Annotated[int, typer.Option(help="forward + backward calls timed")] = 500,
    seq: Annotated[int, typer.Option(help="T (tiny: the GPU must not be the bottleneck)")] = 128,
    profile: Annotated[int, typer.Option(help="also print the N functions with the most own and the most cumulative time (cProfile)")] = 0,
    compiled: Annotated[bool, typer.Option(help="also time each impl under torch.compile(fullgraph=True), after the eager line")] = False,
) -> None:
    """Microseconds per forward + backward of each impl at B=1, H=8, D=64, causal, bf16: wall, and the host's own."""
    mechanism = registry.get(attn)
    for name in impl:
        eager = mechanism.impls[name].run
        runs = [("", eager)]
        if compiled:
            runs.append((" (compiled)", torch.compile(eager, fullgraph=True)))
        for label, run in runs:
            wall, host = host_us_per_call(run, calls, 1, seq, 8, 64)
            typer.echo(f"{attn}/{name}{label}: {wall:.0f} us per forward + backward ({host:.0f} us of host time to issue one)")
        if profile:
            profiler = cProfile.Profile()
            profiler.runcall(host_us_per_call, eager, calls, 1, seq, 8, 64)
            for order in ("tottime", "cumulative"):
                pstats.Stats(profiler).sort_stats(order).print_stats(profile)


if __name__ == "__main__":
    typer.run(main)
