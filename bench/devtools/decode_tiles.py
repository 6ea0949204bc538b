"""Which split-KV decode tile and split count is fastest on this GPU, beside cuDNN in the same
process (issue 24's targets: B = 32 at least cuDNN's speed, B = 1 within 10% of the bandwidth bound).

    python3 -m attnbench.devtools.decode_tiles --out tiles.csv [--batch 1 32] [--context 16384 ...]

bf16, Hq 32, Hkv 8, D 128, one query per sequence, a contiguous cache of L tokens. Every step is
timed as a CUDA graph replay (triton.testing.do_bench_cudagraph: decode is launch-bound at small
batch), our kernel over BLOCK_N x num_warps x num_stages x splits (split_count's choice, half and
twice it), SDPA pinned to cuDNN as the yardstick. Prints the best of ours per shape beside cuDNN.
"""

from __future__ import annotations

import argparse
import csv
import itertools

import torch
import torch.nn.functional as F
import triton.testing

from attnbench.kernels import decode_cost
from attnbench.kernels.decode import decode_attention, sm_count, split_count

HQ, HKV, D = 32, 8, 128
TILES = [{"BLOCK_N": n, "num_warps": w, "num_stages": s} for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]


def _time_us(step) -> float:
    return 1000 * triton.testing.do_bench_cudagraph(step, rep=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for b, l in itertools.product(args.batch, args.context):
        q = torch.randn(b, 1, HQ, D, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(b, l, HKV, D, device=device, dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((b,), l, dtype=torch.int32, device=device)
        moved = decode_cost.softmax_step_bytes(b, l, 1, HQ, HKV, D, 2)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

        def cudnn():
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

        reference = cudnn().transpose(1, 2).float()
        rows.append({"impl": "sdpa-cudnn", "batch": b, "context": l, "us": _time_us(cudnn), "bytes": moved})
        chosen = split_count(b * HKV, l, sm_count(device))
        for tile, splits in itertools.product(TILES, sorted({max(1, chosen // 2), chosen, min(128, 2 * chosen)})):
            def ours():
                return decode_attention(q, k, v, lengths, splits=splits, tile=tile)

            try:
                error = (ours().float() - reference).abs().max().item()
                us = _time_us(ours)
            except Exception as failure:  # a tile that does not fit (shared memory): a row that says so
                rows.append({"impl": "triton", "batch": b, "context": l, **tile, "splits": splits, "chosen": chosen, "error": str(failure)[:80]})
                continue
            rows.append({"impl": "triton", "batch": b, "context": l, **tile, "splits": splits, "chosen": chosen, "us": us,
                         "bytes": moved, "max_abs_vs_cudnn": error})
    columns = ["impl", "batch", "context", "BLOCK_N", "num_warps", "num_stages", "splits", "chosen", "us", "bytes", "max_abs_vs_cudnn", "error"]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    print("B L cudnn_us ours_default_us ours_best_us best_config cudnn/best")
    for b, l in itertools.product(args.batch, args.context):
        shape = [r for r in rows if r["batch"] == b and r["context"] == l and "us" in r]
        cudnn_us = next(r["us"] for r in shape if r["impl"] == "sdpa-cudnn")
        ours = [r for r in shape if r["impl"] == "triton"]
        default = next((r["us"] for r in ours if r["splits"] == r["chosen"] and (r["BLOCK_N"], r["num_warps"], r["num_stages"]) == (64, 4, 3)), float("nan"))
        best = min(ours, key=lambda r: r["us"])
        config = f"N{best['BLOCK_N']} w{best['num_warps']} s{best['num_stages']} splits {best['splits']} (chosen {best['chosen']})"
        print(b, l, f"{cudnn_us:.1f}", f"{default:.1f}", f"{best['us']:.1f}", config, f"{cudnn_us / best['us']:.2f}")


if __name__ == "__main__":
    main()
