"""Standalone GPU benchmark of one decode step, at issue 24's kernel-level target shapes.

    python -m attnbench.kernels.bench_decode --out decode.csv [--batch 1 8 32 64] [--context 1024 ...]
    python -m attnbench.kernels.bench_decode --dry-run --out plan.csv     # the plan, on any machine

Softmax against a KV cache (bf16, Hq = 32, Hkv = 8, D = 128, one new query per sequence, every
sequence holding L tokens): our split-KV kernel on a contiguous cache and on a paged one (page 64,
a shuffled page table), and SDPA pinned to each of its cuDNN, flash and efficient backends with
enable_gqa (a backend that refuses the shape is a row with status unsupported and its reason).
Recurrent steps (B x H = 32 heads x 128 x 128 float32 state): our fused linear-attention and
DeltaNet steps. Each impl gets its own natural layout: ours [B, L, Hkv, D], SDPA [B, Hkv, L, D].

Timing: triton.testing.do_bench (L2 flushed before every repetition) median, p20, p80, after a
first call timed apart (compilation, cuDNN graph building); with --cuda-graph, the step is
captured once and the replay is timed (decode is launch-bound at small batch). GB/s: the bytes a
step must move (kernels/decode_cost.py: the cache read once, K and V, or a state read and written
once, plus q/k/v/o) over the median, and as % of the copy bandwidth measured at the start (a
1 GiB device-to-device copy). The CSVs in results/reference-h200/decode/ predate q/k/v/o and
linear attention's k_sum in the count (cache or kv state alone: under 0.5% less at those shapes).
Imports only torch and triton, like every kernels/ module.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from attnbench.kernels import decode_cost
from attnbench.kernels.decode import H200_SMS, decode_attention, sm_count, split_count
from attnbench.kernels.state_decode import deltanet_step, linear_step

SOFTMAX_IMPLS = ("triton", "triton-paged", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
STATE_IMPLS = ("triton-linear-step", "triton-deltanet-step")
_SDPA_BACKENDS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION"}
COLUMNS = (
    "impl", "batch", "context", "heads", "kv_heads", "head_dim", "page", "dtype", "cuda_graph", "splits",
    "bytes", "status", "message", "first_call_ms", "median_us", "p20_us", "p80_us", "gbps", "pct_copy_bandwidth",
)


@dataclass(frozen=True)
class Case:
    """One timed step. Softmax impls: q [B, 1, Hq, D] against L cached tokens; state impls: one
    token against a float32 state [B, Hq, D, D] (context unused: 0)."""

    impl: str
    batch: int
    context: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page: int = 64
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def bytes(self) -> int:
        """What the step must move (kernels/decode_cost.py): K and V of the cache read once, or the
        state read and written once, plus the token's q (k, v, beta) read and o written."""
        b, h, d, size = self.batch, self.heads, self.head_dim, self.torch_dtype.itemsize
        if self.impl == "triton-linear-step":
            return decode_cost.state_step_bytes(b, decode_cost.linear_state_bytes(h, d, d), h, h, d, d, size)
        if self.impl == "triton-deltanet-step":
            return decode_cost.state_step_bytes(b, decode_cost.deltanet_state_bytes(h, d, d), h, h, d, d, size, gates=h)
        return decode_cost.softmax_step_bytes(b, self.context, 1, h, self.kv_heads, d, size)

    def splits(self, sms: int) -> int | str:
        """Our kernel's split count on a GPU of ``sms`` SMs ('' for the others)."""
        if not self.impl.startswith("triton") or self.impl in STATE_IMPLS:
            return ""
        return split_count(self.batch * self.kv_heads, self.context, sms)


def plan(batches: list[int], contexts: list[int], impls: list[str], **shape) -> list[Case]:
    """Every case, series by series (an impl at one batch across the contexts); ``shape``: Case's
    heads, kv_heads, head_dim, page, dtype (state steps take kv_heads = heads)."""
    cases = []
    for impl in impls:
        for batch in batches:
            if impl in STATE_IMPLS:
                cases.append(Case(impl, batch, 0, **{**shape, "kv_heads": shape.get("heads", Case.heads)}))
            else:
                cases.extend(Case(impl, batch, context, **shape) for context in contexts)
    return cases


def build(case: Case, device: torch.device) -> Callable[[], object]:
    """The inputs of ``case`` on ``device`` and a zero-argument step over them."""
    b, l, hq, hkv, d = case.batch, case.context, case.heads, case.kv_heads, case.head_dim
    dtype = case.torch_dtype

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, dtype=dtype)

    if case.impl in STATE_IMPLS:
        q, k, v = randn(b, hq, d), randn(b, hq, d), randn(b, hq, d)
        state = randn(b, hq, d, d, dtype=torch.float32) * 0.01
        if case.impl == "triton-linear-step":
            k_sum = randn(b, hq, d, dtype=torch.float32).abs()
            return lambda: linear_step(q, k, v, state, k_sum)
        beta = torch.rand(b, hq, device=device, dtype=dtype)
        return lambda: deltanet_step(q, k, v, state, beta)
    lengths = torch.full((b,), l, dtype=torch.int32, device=device)
    if case.impl == "triton":
        q, k, v = randn(b, 1, hq, d), randn(b, l, hkv, d), randn(b, l, hkv, d)
        return lambda: decode_attention(q, k, v, lengths)
    if case.impl == "triton-paged":
        pages = b * math.ceil(l / case.page)
        q, k, v = randn(b, 1, hq, d), randn(pages, case.page, hkv, d), randn(pages, case.page, hkv, d)
        table = torch.randperm(pages, device=device, dtype=torch.int32).view(b, -1)  # a long-running server's shuffle
        return lambda: decode_attention(q, k, v, lengths, page_table=table)
    backend = getattr(torch.nn.attention.SDPBackend, _SDPA_BACKENDS[case.impl])
    q, k, v = randn(b, hq, 1, d), randn(b, hkv, l, d), randn(b, hkv, l, d)

    def sdpa():
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return sdpa


def graphed(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` captured in a CUDA graph (after a call on a side stream, as capture wants): its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write), do_bench median."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _row(case: Case, sms: int, cuda_graph: bool) -> dict:
    """The columns a case fixes before it runs."""
    return {**asdict(case), "cuda_graph": cuda_graph, "splits": case.splits(sms), "bytes": case.bytes, "message": ""}


def measure(case: Case, device: torch.device, cuda_graph: bool, copy_gbps: float | None) -> dict:
    """One row: status ok with the timings, or oom / unsupported / error with the reason (SDPA's
    refusal and the warnings where it says why)."""
    from triton.testing import do_bench

    row = _row(case, sm_count(device), cuda_graph)
    torch.cuda.empty_cache()  # the previous case's inputs are gone; give their blocks back
    try:
        step = build(case, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            try:
                step()
            except RuntimeError as error:
                reasons = "; ".join(str(w.message).splitlines()[0] for w in caught)
                status = "unsupported" if "No available kernel" in str(error) else "error"
                return {**row, "status": status, "message": f"{str(error).splitlines()[0]} {reasons}"[:500]}
            torch.cuda.synchronize(device)
        row["first_call_ms"] = round((time.perf_counter() - started) * 1e3, 3)
        timed = graphed(step) if cuda_graph else step
        median, p20, p80 = do_bench(timed, quantiles=[0.5, 0.2, 0.8])
    except torch.cuda.OutOfMemoryError as error:
        return {**row, "status": "oom", "message": str(error).splitlines()[0]}
    except Exception as error:  # a failed case is a row; the sweep goes on
        return {**row, "status": "error", "message": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]}
    gbps = case.bytes / (median * 1e-3) / 1e9
    return {
        **row, "status": "ok", "median_us": round(median * 1e3, 2), "p20_us": round(p20 * 1e3, 2), "p80_us": round(p80 * 1e3, 2),
        "gbps": round(gbps, 1), "pct_copy_bandwidth": "" if copy_gbps is None else round(100 * gbps / copy_gbps, 1),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m attnbench.kernels.bench_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="CSV to write (one row per case, flushed as it is measured)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="cached tokens L")
    parser.add_argument("--heads", type=int, default=Case.heads, help="query heads Hq (and the state steps' heads)")
    parser.add_argument("--kv-heads", type=int, default=Case.kv_heads, help="kv heads Hkv of the softmax cases")
    parser.add_argument("--head-dim", type=int, default=Case.head_dim)
    parser.add_argument("--page", type=int, default=Case.page, help="page size of the paged cache")
    parser.add_argument("--dtype", default=Case.dtype, choices=["bfloat16", "float16"])
    parser.add_argument("--impl", nargs="+", default=[*SOFTMAX_IMPLS, *STATE_IMPLS], choices=[*SOFTMAX_IMPLS, *STATE_IMPLS])
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA graph replays of the step")
    parser.add_argument("--dry-run", action="store_true", help="write the plan (bytes, split counts for an H200's 132 SMs) without a GPU")
    args = parser.parse_args(argv)
    if min(*args.batch, *args.context, args.heads, args.kv_heads, args.head_dim, args.page) <= 0:
        parser.error("sizes must be positive integers")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "page": args.page, "dtype": args.dtype}
    cases = plan(args.batch, args.context, args.impl, **shape)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run for the plan)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    copy_gbps = None if args.dry_run else copy_bandwidth(device)
    if copy_gbps is not None:
        print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        out_of_memory = set()  # series (impl, batch) that ran out of memory: their longer contexts are skipped
        for case in cases:
            if args.dry_run:
                row = {**_row(case, H200_SMS, args.cuda_graph), "status": "skipped", "message": "dry run"}
            elif (case.impl, case.batch) in out_of_memory:
                row = {**_row(case, sm_count(device), args.cuda_graph), "status": "skipped", "message": "a shorter context ran out of memory"}
            else:
                row = measure(case, device, args.cuda_graph, copy_gbps)
                if row["status"] == "oom":
                    out_of_memory.add((case.impl, case.batch))
            writer.writerow(row)
            handle.flush()
            timing = f"{row['median_us']:>9} us {row['gbps']:>7} GB/s" if row["status"] == "ok" else f"{row['status']}: {row['message']}"
            print(f"{case.impl:<22} B={case.batch:<3} L={case.context:<6} splits={row['splits']!s:<3} {case.bytes / 1e6:>9.1f} MB  {timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
