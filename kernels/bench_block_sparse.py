"""Standalone GPU benchmark of block-sparse attention against the dense kernels, issue 23's shapes.

    python -m attnbench.kernels.bench_block_sparse --out sparse.csv [--seq 4096 16384] [--density 0.1 ...]
    python -m attnbench.kernels.bench_block_sparse --dry-run --out plan.csv     # the plan, on any machine

Causal self-attention, B * T = 16k tokens, H = 16 heads, D = 64 and 128, bf16. Random causal
block masks (blocks of --block tokens, the diagonal always kept, each earlier block kept with the
probability that makes the kept fraction of causal blocks the target density; seeded) run by our
block-sparse kernel (kernels/block_sparse.py) and by FlexAttention (compiled) with the same
BlockMask (BlockMask.from_kv_blocks: the kept earlier blocks full, the diagonal under a causal
mask_mod); against them the dense causal kernels: ours (kernels/flash.py) and SDPA's cuDNN
backend. Layouts: ours [B, T, H, D], SDPA's and Flex's [B, H, T, D].

Modes fwd and fwdbwd (the three gradients by torch.autograd.grad). Timing: triton.testing.do_bench
(L2 flushed before every repetition) median, p20, p80, after a first call timed apart (autotuning,
compilation, cuDNN graph building). FLOPs (FlashAttention-3 convention, kernels/block_mask.py):
4 * D per visible pair of the blocks visited (dense: of every causal block), fwdbwd 3.5x.
Imports only torch and triton, like every kernels/ module.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from attnbench.kernels.block_mask import block_lists, block_sparse_flops, blocks

SPARSE_IMPLS = ("triton-sparse", "flex-sparse")
DENSE_IMPLS = ("triton-dense", "sdpa-cudnn")
MODES = ("fwd", "fwdbwd")
FWDBWD_FLOPS = 3.5  # 1 (fwd) + 2.0 (bwd) + 0.5 (recompute of P in the bwd)
COLUMNS = (
    "impl", "mode", "batch", "seq", "heads", "head_dim", "block", "dtype", "target_density", "density",
    "flops", "status", "message", "first_call_ms", "median_ms", "p20_ms", "p80_ms", "tflops",
)


@dataclass(frozen=True)
class Case:
    """One timed op: q, k, v [B, T, H, D] (or [B, H, T, D]), causal; dense impls: density 1."""

    impl: str
    mode: str
    batch: int
    seq: int
    head_dim: int
    target_density: float
    heads: int = 16
    block: int = 64
    dtype: str = "bfloat16"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def random_causal_mask(case: Case, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [B, H, N, N] of N = cdiv(T, block): the diagonal, and each earlier block with the
    probability that keeps ``target_density`` of the N (N + 1) / 2 causal blocks in expectation."""
    n = blocks(case.seq, case.block)
    causal_blocks, diagonal = n * (n + 1) // 2, n
    keep = 0.0 if n == 1 else min(1.0, max(0.0, (case.target_density * causal_blocks - diagonal) / (causal_blocks - diagonal)))
    generator = torch.Generator().manual_seed(case.seed)
    below = torch.ones(n, n, dtype=torch.bool).tril(-1)
    mask = (torch.rand(case.batch, case.heads, n, n, generator=generator) < keep) & below
    return (mask | torch.eye(n, dtype=torch.bool)).to(device)


def density_of(mask: torch.Tensor) -> float:
    """Kept fraction of the causal blocks of a causal block mask [B, H, N, N]."""
    n = mask.shape[-1]
    return mask.sum().item() / (mask.shape[0] * mask.shape[1] * n * (n + 1) // 2)


def plan(seqs: list[int], head_dims: list[int], densities: list[float], impls: list[str], tokens: int, **shape) -> list[Case]:
    """Every case, series by series (an impl and mode at one head_dim across lengths and densities)."""
    cases = []
    for impl in impls:
        for mode in MODES:
            for head_dim in head_dims:
                for seq in seqs:
                    for density in densities if impl in SPARSE_IMPLS else [1.0]:
                        cases.append(Case(impl, mode, max(1, tokens // seq), seq, head_dim, density, **shape))
    return cases


def _flex_block_mask(mask: torch.Tensor, case: Case):
    """FlexAttention's BlockMask of a causal block mask [B, H, N, N]: the kept earlier blocks full
    (no mask_mod), the diagonal partial under the causal mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    n = mask.shape[-1]
    diagonal = torch.eye(n, dtype=torch.bool, device=mask.device)
    partial, full = block_lists(mask & diagonal, case.block), block_lists(mask & ~diagonal, case.block)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(
        partial.kv_num, partial.kv_idx, full.kv_num, full.kv_idx, BLOCK_SIZE=case.block, mask_mod=causal, seq_lengths=(case.seq, case.seq)
    )


def build(case: Case, device: torch.device) -> Callable[[], object]:
    """The inputs of ``case`` on ``device`` and a zero-argument op over them (fwd, or fwd + the three gradients)."""
    from attnbench.kernels.block_sparse import block_sparse_attention
    from attnbench.kernels.flash import flash_attention

    b, t, h, d = case.batch, case.seq, case.heads, case.head_dim
    heads_first = case.impl in ("sdpa-cudnn", "flex-sparse")
    shape = (b, h, t, d) if heads_first else (b, t, h, d)
    grad = case.mode == "fwdbwd"
    q, k, v = (torch.randn(shape, device=device, dtype=case.torch_dtype, requires_grad=grad) for _ in range(3))
    do = torch.randn(shape, device=device, dtype=case.torch_dtype)
    if case.impl == "triton-sparse":
        lists = block_lists(random_causal_mask(case, device), case.block)
        op = lambda: block_sparse_attention(q, k, v, lists, causal=True)  # noqa: E731
    elif case.impl == "triton-dense":
        op = lambda: flash_attention(q, k, v, causal=True)  # noqa: E731
    elif case.impl == "sdpa-cudnn":
        def op():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        block_mask = _flex_block_mask(random_causal_mask(case, device), case)
        compiled = torch.compile(flex_attention)
        op = lambda: compiled(q, k, v, block_mask=block_mask)  # noqa: E731
    if not grad:
        return op
    return lambda: torch.autograd.grad(op(), (q, k, v), do)


def flops(case: Case) -> float:
    """FLOPs of the op: the visited blocks' visible pairs (every causal block for dense impls)."""
    mask = random_causal_mask(case) if case.impl in SPARSE_IMPLS else torch.ones(1, 1, blocks(case.seq, case.block), blocks(case.seq, case.block), dtype=torch.bool)
    forward = block_sparse_flops(mask, case.seq, case.seq, case.heads, case.head_dim, case.block, causal=True)
    forward *= case.batch // mask.shape[0]
    return forward * (FWDBWD_FLOPS if case.mode == "fwdbwd" else 1.0)


def _row(case: Case) -> dict:
    """The columns a case fixes before it runs."""
    row = {k: v for k, v in asdict(case).items() if k != "seed"}
    density = density_of(random_causal_mask(case)) if case.impl in SPARSE_IMPLS else 1.0
    return {**row, "density": round(density, 4), "flops": flops(case), "message": ""}


def measure(case: Case, device: torch.device) -> dict:
    """One row: status ok with the timings, or oom / error with the reason."""
    from triton.testing import do_bench

    row = _row(case)
    torch.cuda.empty_cache()
    try:
        op = build(case, device)
        started = time.perf_counter()
        op()
        torch.cuda.synchronize(device)
        row["first_call_ms"] = round((time.perf_counter() - started) * 1e3, 3)
        median, p20, p80 = do_bench(op, quantiles=[0.5, 0.2, 0.8])
    except torch.cuda.OutOfMemoryError as error:
        return {**row, "status": "oom", "message": str(error).splitlines()[0]}
    except Exception as error:  # a failed case is a row; the sweep goes on
        return {**row, "status": "error", "message": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]}
    return {
        **row, "status": "ok", "median_ms": round(median, 4), "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
        "tflops": round(row["flops"] / (median * 1e-3) / 1e12, 1),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m attnbench.kernels.bench_block_sparse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="CSV to write (one row per case, flushed as it is measured)")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="B * T: the batch is tokens // seq")
    parser.add_argument("--heads", type=int, default=Case.heads)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--density", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0], help="kept fraction of the causal blocks")
    parser.add_argument("--block", type=int, default=Case.block, help="tokens per mask block (a multiple of 64)")
    parser.add_argument("--dtype", default=Case.dtype, choices=["bfloat16", "float16"])
    parser.add_argument("--impl", nargs="+", default=[*SPARSE_IMPLS, *DENSE_IMPLS], choices=[*SPARSE_IMPLS, *DENSE_IMPLS])
    parser.add_argument("--dry-run", action="store_true", help="write the plan (densities, FLOPs) without a GPU")
    args = parser.parse_args(argv)
    if min(*args.seq, args.tokens, args.heads, *args.head_dim, args.block) <= 0:
        parser.error("sizes must be positive integers")
    if not all(0.0 < density <= 1.0 for density in args.density):
        parser.error("densities must lie in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cases = plan(args.seq, args.head_dim, args.density, args.impl, args.tokens, heads=args.heads, block=args.block, dtype=args.dtype)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run for the plan)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for case in cases:
            row = {**_row(case), "status": "skipped", "message": "dry run"} if args.dry_run else measure(case, device)
            writer.writerow(row)
            handle.flush()
            timing = f"{row['median_ms']:>9} ms {row['tflops']:>6} TFLOP/s" if row["status"] == "ok" else f"{row['status']}: {row['message']}"
            print(f"{case.impl:<14} {case.mode:<7} B={case.batch:<2} T={case.seq:<6} D={case.head_dim:<4} density={row['density']:<7} {timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
