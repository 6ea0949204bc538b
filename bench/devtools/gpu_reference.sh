#!/usr/bin/env bash
# The reference GPU runs committed under results/ (see results/README.md), one stage per
# device call (each under its 10-minute limit). Usage: bash bench/devtools/gpu_reference.sh STAGE OUT_DIR
# (all output: OUT_DIR/STAGE.tar.gz, one file, since the device brings back at most 8; it is
# rewritten after every step and every 45 s, so a call killed at its limit still brings back
# what was done. Every step has its own time limit inside the stage's budget BUDGET_S, which
# must stay under the call's limit; sweeps save series by series, so a step cut by its limit
# keeps what it finished).
#   kernels:  a model-level profile, the exact-family grid (D 64 and 128), sliding-window scaling
#   variants: rope/alibi/exposb against their peers, standard in the same run
#   train:    GPT small with standard/rope/alibi/exposb (#4), alone on the GPU (batch 8: under 3
#             epochs of the corpus; training at batch 8 is launch-bound, so contention halves it)
#   quality:  every other mechanism with the same settings, one process each, CUDA tests alongside (#6)
#   followup: fla's NSA at GQA 16:1, and exact softmax / DeltaNet beside linear and performer on the H200
#   tests:    every CUDA test, `check` for exposb
#   distill:  a standard teacher, distilled into performer/linear/window/nsa (window 128, nsa
#             top-2 blocks), then the fla tests (#7, #6)
#   launch:   the flash kernels' CUDA tests, host time per attention call, then the model-level
#             step three times (its run-to-run spread) (#4)
#   tiles:    every candidate flash tile at D = 64 (python3 -m attnbench.devtools.tile_sweep)
#   tma:      the flash kernels' loops reading tiles through TMA descriptors: their CUDA tests, every
#             tile both ways, then the model-level step (#4)
#   tma-followup: each kernel's own tiles at D = 128 and 256 both ways, host time per call, the
#             model-level step three times, after the D = 64 lists were re-chosen from `tma`
#   tma-final: after the host-time cuts (cached problems, direct launcher calls, reused scratch):
#             the flash CUDA tests, host time per call, the model-level step three times, and the
#             exact-softmax grid at 4k and 16k against cuDNN and FlashAttention-2 (D 64 and 128)
#   graph:    the model-level step eager and as a CUDA graph replay (--level model-graph: GPU time
#             alone, where the eager step is host-bound), three runs each, and the sweep's CUDA tests
#   host:     after cheaper signatures, TMA checks and grids: the flash CUDA tests, host time per
#             call (profiled), the model-level step eager twice and as a graph once
#   check:    `attnbench check` of the flash family (TMA loads for all but rope) to T = 4k, bf16 and fp16
#   packed:   the one-piece qkv gradient: the flash CUDA tests, the layer test on the GPU, the sweep's
#             graph tests, then the model-level step of standard, rope and alibi as a CUDA graph
#             twice and eager once
#   rope:     RoPE as rotation passes outside the kernels' loops: the flash CUDA tests, rope and
#             standard against SDPA at D = 128 (the variants table's shapes), the model-level step of
#             standard, rope and alibi as a CUDA graph and eager
#   rope-epilogue: dq and dk rotated back in the backward kernels' epilogues (no float32 gradient
#             buffers, no extra pass): the flash CUDA tests, the `rope` stage's variants and model steps
#   rope-check: after the RoPE tables covered queries before the first key: the flash tests with
#             RoPE on the GPU (small and real sizes), `attnbench check` of rope (bf16) to T = 4k
#   final:    after `rope`: `attnbench check` of rope (bf16) to T = 4k, then the model-level step of
#             standard, rope and alibi as a CUDA graph twice and eager twice (their spread)
#   lean:     lse and delta read through TMA in dk/dv (no per-thread masked loads), the forward's
#             softmax scale folded into its exponent: the flash CUDA tests, every D = 64 tile, the
#             model-level step as a CUDA graph
#   edges:    masked tiles test only the band edges their problem has, scores scaled inside exp2's
#             FMA everywhere, the D = 64 dk/dv list re-chosen from `lean`: the flash CUDA tests,
#             every D = 64 tile, the model-level step of standard, rope and alibi as a CUDA graph
#             twice and of standard eager once
#   registers: dk/dv's D = 64 tile capped at 168 registers (three programs per SM): the flash CUDA
#             tests, every D = 64 tile, the model-level step of standard, rope and alibi as a CUDA
#             graph twice and of standard eager once
#   registers-check: after `registers`: the tile sweep's and launcher's CUDA tests, `attnbench check`
#             of the flash family (standard, rope, alibi, window) to T = 4k in bf16
#   registers-grid: after `registers`: the exact-softmax grid (D 64 and 128, 4k and 16k, against
#             cuDNN and FlashAttention-2) and rope/standard against SDPA at D = 128 (the variants rows)
#   alibi-float: after ALiBi's distance moved to float32 (fewer registers under dk/dv's cap) and dk/dv's
#             second D = 64 candidate went uncapped: the flash CUDA tests, the model-level step of
#             standard, rope and alibi as a CUDA graph
#   layers:   every mechanism and impl at layer level to T = 64k (the crossover figure), model level
#   decode:   the decode kernels' tests on the GPU, then one decode step at issue 24's shapes (B 1-64,
#             L 1k-64k, Hq 32, Hkv 8, D 128, bf16): ours contiguous and paged against SDPA's backends,
#             and the one-token state steps, eager and as CUDA graph replays
#   sparse:   after the rooms, positions and block-sparse merges: every CUDA test of kernels/ and
#             models/ (the exposb split, window x rope/alibi, the block-sparse kernel, learned), then the
#             block-sparse kernel against our dense kernel, cuDNN and flex at densities 0.1-1 (#23)
#   sparse-list: the block-sparse kernels walking the listed tiles in one loop (#23): their CUDA tests and the
#             dense kernel's, then the kernel against our dense kernel, cuDNN and flex at blocks 64 and 128
#   decode-peers: #24's decode forms and peers added since decode-cli (flex beside sdpa and ours; performer's
#             state step), their CUDA tests and generate's, B 1 and 32, L 1k-64k, Hq 32, Hkv 8, D 128
#   decode-model: #24's decode sweep with every peer (SDPA cuDNN/flash pinned, flex, fla's one-token steps at
#             MHA), Hq 32, Hkv 8, D 128, B 1-64, L 1k-64k, then GPT small's decode step at the model level
#   decode-tune: #24's split-KV decode kernel over tiles and split counts beside cuDNN, and its ncu profile
#   serve:    #24's packed varlen prefill/training beside flex and SDPA, the tuned decode kernel beside cuDNN, GPT small's
#             decode step as a CUDA graph (model-graph), bsbr/nsa decode steps
#   varlen:   #24's packed varlen again after serve, the backward without TMA: its CUDA tests and the pack beside flex, SDPA
#   serve-final: #24's reference run after the decode tuning and the varlen fixes (the earlier runs' files were lost):
#             the kernel-level decode sweep (B 1-64, L 1k-64k, Hq 32, Hkv 8, D 128) with the report, the MHA state steps
#             beside fla, GPT small's decode step as a CUDA graph, the varlen pack beside flex and SDPA and our dense kernel
#   short-tiles: #25's short sequences: every flash tile at T 512, 1k, 2k (16k tokens, H 16, D 64 and 128, causal) beside cuDNN
#   learned-causal: `learned`'s teacher and learned students again after the gates became causal (query block i
#             scored by block i - 1's queries); the other students are unchanged (seeded, not learned) and not re-run
#   short-check: after short-tiles' D = 128 first choices: the flash CUDA tests, the exact grid at T 512-4k (D 64 and 128)
#             against cuDNN, `attnbench speed --seq 512 4096`, fla's DeltaNet step at MHA (#24), ncu of the D = 64
#             forward at T = 512 beside cuDNN's (what limits the short forward)
#   hopper-fwd: #25's warp-specialised Hopper forward (kernels/flash_fwd_hopper.py): a smoke run against
#             SDPA (it stops the stage if it fails), the flash CUDA tests, then the forward beside the
#             portable kernel's own tiles and cuDNN (tile_sweep: T 512-16k, 16k tokens, H * D = 2048)
#   pingpong: #25's Hopper forward as a producer and two consumer warpgroup partitions, with and without
#             turns (PINGPONG): the smoke run, its CUDA tests, the hopper-fwd sweep, then Nsight Compute
#             of it and of the portable forward (D 64 causal, T 4k, B 4, H 32)
#   hopper-tiles: #25's Hopper forward made persistent (one program per SM walking work items, or one per item),
#             with each candidate tile (D 64: three consumer warpgroups at 128 registers or two at 168): the smoke
#             run, its CUDA tests, the hopper-fwd sweep (D 64 and 128)
#   exact-grid: #25's must-show grid: `attnbench speed --attn standard --impl triton,sdpa-cudnn,sdpa-flash,flex
#             --tokens 16384 --seq 512 1024 4096 16384 --mode fwd --mode fwdbwd --causal --bidirectional` at D 64
#             and 128 (H = 2048 / D), with its report (speedups over cuDNN, FlashAttention-2 and flex)
#   model-steps: must-show's model-level step alone (GPT small, triton against SDPA, T 1k and 4k, eager and as a
#             CUDA graph, three runs each), for a call with too little time for the whole of must-show
#   must-show: ExpoSB's CUDA tests; exposb beside standard (triton, D 64 and 128, T 1k-16k, causal, fwd and
#             fwd+bwd; exposb-ratios.txt); #25's must-show model-level step (GPT small, triton against SDPA, T 1k
#             and 4k), eager and as a CUDA graph, three runs each, with their report
#   exposb-profile: every candidate tile of ExpoSB's kernels at T 1k and 4k (exposb_tile_sweep), ncu of its three
#             kernels (D 128 causal T 4k, B 4, H 16) and of the Hopper and the portable forward at D 128 causal T 512
#             (B 32, H 16); `attnbench check` of standard, rope, alibi, window, exposb to T = 4k
#   exposb-tiles: after _GPU_TILES took exposb-profile's fastest tiles and the Hopper forward got HEAD_BY_HEAD: the
#             Hopper forward's smoke run, exposb beside standard (exposb-ratios.txt, as in must-show), ExpoSB's CUDA
#             tests, the Hopper forward's CUDA tests (every schedule), its sweep at D 128 and 64 (hopper-fwd-heads beside the
#             other schedules, the portable tiles and cuDNN), then the ExpoSB tile sweep at D 128 bidirectional
#             (dk/dv's bidirectional tile was never timed; the causal sweep ran in exposb-profile)
#   short-ncu: #25 after head by head became the Hopper forward's order: Nsight Compute of it and of the portable
#             forward at D 128 causal T 512 (B 32, H 16), then `attnbench check` of alibi, window and exposb (triton)
#             to T = 4k, which exposb-profile's 120 s did not reach
#   persistent-heads: #25's Hopper forward persistent and head by head (tile_sweep's hopper-fwd-persistent-heads)
#             beside its other schedules, the portable tiles and cuDNN (D 128 and 64, T 512-16k), then every
#             hopper CUDA test (each schedule and head dim, the D 64 cases among them)
#   plans:    #25's Hopper forward with a plan per head dim and mask (PLANS: D 64 bidirectional on from 512 keys,
#             two consumers, persistent; D 64 causal from 16k): the smoke run, every hopper CUDA test, the exact
#             grid at D 64 (as exact-grid's)
#   deeper-rings: #25's D 128 Hopper forward with three ring stages or 64-key tiles (four stages) beside its
#             plan's tile (the sweep at D 128), the tile CUDA tests, then `attnbench check` of standard (triton) to
#             16k keys with the plans' routes
#   pairs:    #25's Hopper forward with work groups of two query blocks (n - 1 - i and i of a head: every causal
#             group the same cost, a persistent program's share balanced): the schedule CUDA tests, then the
#             causal sweep at D 128 and 64 (tile_sweep's hopper-fwd-pairs, hopper-fwd-persistent-pairs)
#   pair-plans: #25's Hopper forward with the causal plans paired (PLANS by key length): the smoke run, every hopper
#             CUDA test, host time per call at T 512 (the Hopper forward) and 128 (the portable one), the exact
#             grid at EXACT_DIMS (default 128; as exact-grid's)
#   pair-steps: after pair-plans, the exact grid at D 64 (GPT small's head dim: its causal forward now paired on the
#             Hopper path from 512 keys), then the model-level step eager and graph, three runs each (STEP_S each)
#   steps-dkdv: pair-steps, then (the stage's budget allowing) the CUDA tests of the Gluon dk/dv kernel and of every
#             Hopper forward tile at both masks (the one-consumer tiles among them), then dk/dv's timing as dkdv-per-sm's
#   h200-grid: #25 on the H200 after steps-dkdv: the Gluon dk/dv kernel under each of its tiles (one or two warpgroups,
#             pipelined or not: its CUDA tests, then the backward with each beside the portable one), the exact grid
#             at D 128, ncu of the dk/dv kernels (PERF_NOTES 24, 26), then the causal sweep at D 128 and 64 (the
#             one-consumer tiles at short T)
#   dkdv-keys: #25's Gluon dk/dv kernel under each of its tiles (one or two warpgroups, pipelined or not): its CUDA
#             tests, the backward timed with each beside the portable dk/dv kernel, and each under ncu
#   dkdv-per-sm: #25's Gluon dk/dv kernel (kernels/flash_dkdv_hopper.py, off by default) and the Hopper forward's
#             one-consumer tiles (two programs an SM): the smoke run, every hopper CUDA test (dk/dv's on the hopper
#             cases and the new tiles' among them), the whole backward with the portable dk/dv kernel and with the
#             Gluon one (D 64 and 128, both masks, T 1k-16k, 16k tokens, H * D 2048), then the causal sweep at D 128
#             and 64 (every tile and schedule of the Hopper forward beside the portable tiles and cuDNN)
#   exposb-prepass: #25's ExpoSB with q', k' formed by a prepass: its CUDA tests, then exposb beside the
#             standard kernel (triton) and SDPA, fwd and fwd+bwd, causal, D 64 and 128, T 1k-16k
#   defaults: what a new user runs first, with no other option, timed: `attnbench train --attn rope`
#             and `attnbench speed --seq 512 4096` (#20: sized to the GPU, no overfitting warning)
#   grid:     issue 22's grid, GPT small clm at 512 tokens, 2000 steps of batch 4 (1.6 epochs): forms
#             standard, linear, topk, window (128), block against sinusoidal, rope and alibi, one
#             process per cell: 14 trainings sharing the GPU, so their tokens/s compare within the grid only
#   bert:     BERT small MLM runs of standard (learned), rope, alibi and exposb, the grid's steps and
#             batch, extrapolation to 4x, one process each (BERT=1 adds them to the grid stage's call)
#   learned:  issue 23: a GPT small teacher (`train`'s CUDA default: 1235 x 8 x 512, 2 epochs), distilled
#             1000 steps into learned at L1 0.001, 0.01, 0.1 (one process) and into nsa, window (128),
#             performer, linear (another, alongside), then both resumed at their last step on the quiet
#             GPU to measure costs and layer times at 1k/4k/16k; the report with the Pareto figure;
#             a layer-level profile of learned beside standard (wall against GPU-busy time)
#   decode-cli: issue 24's decode through `attnbench speed --mode decode` (standard, linear, deltanet; B 1-64,
#             L 1k-64k, Hq 32, Hkv 8, D 128) with its CUDA tests, and host time per call with the custom ops
#   gate:     the correctness gate on the GPU: the window x rope/alibi x GQA cells of the softmax family
#             (`attnbench check --attn standard,window --positions rope,alibi --window 256`) to T = 4k,
#             every impl of every mechanism to T = 2k (`check --attn all`), and `speed --check` of standard
set -uo pipefail
stage=$1 dest=$2
work=/tmp/attnbench-gpu
out="$work/$stage"
mkdir -p "$out" "$dest"
pack() {  # the stage's folder as one tarball in OUT_DIR (weights stay behind: too large to bring back)
    local part="$dest/.$stage.tar.gz.$BASHPID"
    tar -czf "$part" --exclude=checkpoints --exclude=students -C "$work" "$stage" 2> /dev/null
    mv -f "$part" "$dest/$stage.tar.gz"
}
(while sleep 45; do pack; done) &
packer=$!
disown $packer  # not among the jobs that the stages' `wait` waits for
trap 'kill $packer 2> /dev/null; pack' EXIT
deadline=$((SECONDS + ${BUDGET_S:-575}))
export PYTHONUNBUFFERED=1 ATTNBENCH_FAILURES_NOW=1  # tracebacks as failures happen (tests/conftest.py)
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/pip.log" 2>&1 || { tail "$out/pip.log"; exit 1; }
if ls .whl/*.whl > /dev/null 2>&1; then  # optional peers (fla-core) carried as wheels
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit --format=csv | tee "$out/gpu.txt"

limit() {  # limit SECONDS CMD...: run CMD for at most SECONDS, and never past the stage's deadline
    local left=$((deadline - SECONDS)); local t=$(($1 < left ? $1 : left))
    if ((t <= 5)); then echo "skipped (stage budget spent): ${*:2}" | tee -a "$out/skipped.txt"; return 0; fi
    timeout "$t" "${@:2}" || echo "exit $? after at most ${t}s: ${*:2}" | tee -a "$out/skipped.txt"
    pack
}
speed() { limit "$1" attnbench speed "${@:2}" --measure-peak 2>&1 | tail -80; }
bert() {  # bert TRAIN OPTIONS...: BERT MLM runs of standard (learned), rope, alibi, exposb, one background process each
    for attn in standard rope alibi exposb; do
        limit 520 attnbench train --attn "$attn" --task mlm "$@" --out "$out/bert/$attn" > "$out/bert-$attn.txt" 2>&1 &
    done
}
bert_report() {
    attnbench report "$out"/bert/* --out "$out/bert-report" > /dev/null 2>&1
    for f in "$out"/bert-*.txt; do echo "$(basename "$f"): $(grep -v "━" "$f" | tail -1)"; done
    grep -A8 "| mechanism" "$out/bert-report/train_report.md" | head -8
}
fla_tests() {  # fla_tests SECONDS: every fla impl against our reference, verbose, a limit per test
    limit "$1" python3 -m pytest -v -m cuda tests/models -k fla --timeout 120 --tb=short > "$out/fla_tests.txt" 2>&1
}
cuda_tests() {  # every CUDA test, verbose, a limit per test (a failure is named as it happens, even if
               # the stage is cut); two processes, so one's Triton compiles overlap the other's
    limit 300 python3 -m pytest -v -m cuda tests/kernels tests/bench --timeout 120 -rf --tb=short > "$out/cuda_tests_kernels_bench.txt" 2>&1 &
    local first=$!
    limit 300 python3 -m pytest -v -m cuda tests/models --timeout 120 -rf --tb=short > "$out/cuda_tests_models.txt" 2>&1
    wait $first
    grep -h -E "FAILED|ERROR|error [0-9]|passed|failed" "$out"/cuda_tests_*.txt | tail -40
}
flash_tests() {  # flash_tests SECONDS [MORE TEST FILES...]: the flash kernels' CUDA tests (real sizes among them), verbose
    limit "$1" python3 -m pytest -v -m cuda tests/kernels/test_flash.py tests/kernels/test_flash_launch.py "${@:2}" \
        --timeout 180 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/cuda_tests.txt" | tail -8
}
exposb_tests() {  # exposb_tests SECONDS [MORE TEST FILES...]: ExpoSB's CUDA tests (real sizes among them), verbose
    limit "$1" python3 -m pytest -v -m cuda tests/kernels/test_exposb_kernel.py tests/kernels/test_exposb_prepass.py "${@:2}" \
        --timeout 180 -rf --tb=short > "$out/exposb_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/exposb_tests.txt" | tail -8
}
exposb_sweep() {  # exposb_sweep SECONDS D MASK: every candidate tile of ExpoSB's kernels at T 1k and 4k, causal or bidirectional
    local name="exposb-tiles-d$2"  # causal: the name exposb-profile's files have
    [[ $3 == causal ]] || name+="-$3"
    limit "$1" python3 -m attnbench.devtools.exposb_tile_sweep --seq 1024 --seq 4096 --head-dim "$2" --"$3" --out "$out/$name.csv" \
        > "$out/$name.txt" 2>&1
    grep -E "^B=|standard" "$out/$name.txt"
}
hopper_smoke() {  # the Hopper forward beside SDPA in float32 on four shapes; stops the stage if it does not finish
    limit 60 python3 -c "
import torch
from attnbench.kernels import flash_fwd_hopper
from attnbench.kernels.flash import flash_attention
flash_fwd_hopper.PLANS = flash_fwd_hopper.EVERYWHERE
for d, causal, t, s in ((64, True, 1000, 1000), (128, False, 700, 1500), (64, False, 2048, 2048), (128, True, 4096, 4096)):
    q = torch.randn(2, t, 8, d, device='cuda', dtype=torch.bfloat16)
    k, v = (torch.randn(2, s, 2, d, device='cuda', dtype=torch.bfloat16) for _ in range(2))
    o = flash_attention(q, k, v, causal=causal)
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v)), is_causal=causal, enable_gqa=True).transpose(1, 2)
    print('smoke', d, causal, t, s, 'max error', (o.float() - ref).abs().max().item())
" > "$out/smoke.txt" 2>&1
    cat "$out/smoke.txt" | tail -12
    grep -q "smoke 128 True" "$out/smoke.txt" || exit 1
}
hopper_sweep() {  # hopper_sweep [HEAD DIMS...]: the Hopper forward beside the portable kernel's tiles and cuDNN,
                 # D 64 and 128 (default), MASKS (default both: causal no-causal), T 512-16k
    for d in ${*:-64 128}; do
        for c in ${MASKS:-causal no-causal}; do
            limit "${SWEEP_S:-70}" python3 -m attnbench.devtools.tile_sweep --seq 512 --seq 1024 --seq 4096 --seq 16384 --heads $((2048 / d)) \
                --head-dim $d --$c --kernels fwd --no-neighbours --out "$out/fwd-d$d-$c.csv" > "$out/fwd-d$d-$c.txt" 2>&1
            grep -E "^B=|hopper|cudnn-fwd|^fwd" "$out/fwd-d$d-$c.txt"
        done
    done
}
ncu_of() {  # ncu_of NAME KERNEL_REGEX LAUNCHES PYTHON: Nsight Compute of LAUNCHES launches matching KERNEL_REGEX
           # (after the first 3) while PYTHON runs; ncu-NAME.txt, its headline lines printed
    limit 60 ncu --clock-control none -k regex:"$2" --launch-skip 3 --launch-count "$3" \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \
        python3 -c "$4" > "$out/ncu-$1.txt" 2>&1
    grep -E "  [a-z_].*\(|Duration|Compute \(SM\) Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issue Slots Busy|Executed Ipc" "$out/ncu-$1.txt" | head -$((14 * $3))
}
hopper_ncu() {  # hopper_ncu KERNEL [B T H D]: Nsight Compute of flash_fwd_hopper or the portable flash_fwd_kernel, causal,
                # default D 64 at 4k (B 4, H 32); ncu-KERNEL.txt, or ncu-KERNEL-tT-dD.txt for another shape
    local shape=(${2:-4} ${3:-4096} ${4:-32} ${5:-64})
    ncu_of "$1${2:+-t$3-d$5}" "$1" 1 "
import torch
from attnbench.kernels import flash_fwd_hopper
from attnbench.kernels.flash import flash_attention
flash_fwd_hopper.PLANS = flash_fwd_hopper.EVERYWHERE if '$1' == 'flash_fwd_hopper' else flash_fwd_hopper.NOWHERE
q, k, v = (torch.randn(${shape[0]}, ${shape[1]}, ${shape[2]}, ${shape[3]}, device='cuda', dtype=torch.bfloat16) for _ in range(3))
for _ in range(5):
    flash_attention(q, k, v, causal=True)
torch.cuda.synchronize()
"
}
exposb_ncu() {  # exposb_ncu B T H D: Nsight Compute of ExpoSB's forward, dq and dk/dv kernels, causal bf16 (ncu-exposb-tT-dD.txt)
    ncu_of "exposb-t$2-d$4" "exposb_(fwd|dq|dkdv)_kernel" 3 "
import torch
from attnbench.kernels.exposb import exposb_attention_triton
q, k, v = (torch.randn($1, $2, $3, $4, device='cuda', dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
params = {n: torch.full(($3,), x, device='cuda') for n, x in dict(lam=0.02, alpha=0.1, beta=1.0, gamma=0.5, mu=$4 / 2, sigma=$4 / 4, delta=0.001).items()}
for _ in range(3):
    exposb_attention_triton(q, k, v, causal=True, **params).sum().backward()
torch.cuda.synchronize()
"
}
dkdv_ncu() {  # dkdv_ncu: Nsight Compute of the portable dk/dv kernel and the Gluon one under each of its tiles,
            # D 64 causal 4k (B 4, H 32; ncu-dkdv.txt)
    ncu_of dkdv "flash_dkdv(_hopper)?_kernel" 5 "
import torch
from attnbench.kernels import flash_dkdv_hopper
from attnbench.kernels.flash import flash_problem
from attnbench.kernels.flash_bwd import flash_backward
from attnbench.kernels.flash_fwd import flash_forward
q, k, v, do = (torch.randn(4, 4096, 32, 64, device='cuda', dtype=torch.bfloat16) for _ in range(4))
problem = flash_problem(q, k, causal=True)
o, lse = flash_forward(q, k, v, problem)
for on, tile in [(False, None)] * 4 + [(True, tile) for tile in flash_dkdv_hopper.TILES]:  # ncu skips 3: portable, then each tile
    flash_dkdv_hopper.HOPPER_DKDV, flash_dkdv_hopper.TILE[64] = on, tile
    flash_backward(q, k, v, o, lse, do, problem)
torch.cuda.synchronize()
"
}
host_time() {  # host_time [OPTIONS...]: host microseconds per attention call, triton and SDPA
    limit 60 python3 -m attnbench.devtools.host_overhead --impl triton --impl sdpa "$@" > "$out/host.txt" 2>&1
    grep "per forward" "$out/host.txt"
}
dkdv_timing() {  # dkdv_timing SECONDS: the backward with the portable dk/dv kernel and with the Gluon one under each of
               # its tiles (dkdv.txt)
    limit "$1" python3 -c "
import torch
from attnbench.kernels import flash_dkdv_hopper
from attnbench.kernels.flash import flash_problem
from attnbench.kernels.flash_bwd import flash_backward
from attnbench.kernels.flash_fwd import flash_forward
from attnbench.timing import measure
cuda = torch.device('cuda')
for d in (64, 128):
    for causal in (True, False):
        for t in (1024, 4096, 16384):
            q, k, v, do = (torch.randn(16384 // t, t, 2048 // d, d, device=cuda, dtype=torch.bfloat16) for _ in range(4))
            problem = flash_problem(q, k, causal=causal)
            o, lse = flash_forward(q, k, v, problem)
            ms = []
            for on, tile in [(False, None)] + [(True, tile) for tile in flash_dkdv_hopper.TILES]:
                flash_dkdv_hopper.HOPPER_DKDV, flash_dkdv_hopper.TILE[d] = on, tile
                ms.append(measure(lambda: flash_backward(q, k, v, o, lse, do, problem), cuda).median_ms)
            gluon = ', '.join(f'{tile.keys}/{tile.stages}{\"p\" * tile.pipelined} {x:.3f} ({ms[0] / x:.2f}x)' for tile, x in zip(flash_dkdv_hopper.TILES, ms[1:]))
            print(f'backward D {d} causal {causal} T {t}: portable {ms[0]:.3f} ms; Gluon dk/dv, keys/stages(p: pipelined) {gluon}', flush=True)
" > "$out/dkdv.txt" 2>&1
    cat "$out/dkdv.txt" | tail -14
}
exact_grid() {  # exact_grid HEAD_DIMS...: #25's must-show exact-softmax grid at each head dim (H = 2048 / D), with its report
    for d in "$@"; do
        speed 270 --attn standard --impl triton,sdpa-cudnn,sdpa-flash,flex --tokens 16384 --seq 512 1024 4096 16384 \
            --mode fwd --mode fwdbwd --causal --bidirectional --heads $((2048 / d)) --head-dim $d --out "$out/exact-d$d" > "$out/exact-d$d.txt"
        tail -n 4 "$out/exact-d$d.txt"
    done
    attnbench report "$out"/exact-d*/ --baseline sdpa-cudnn --baseline sdpa-flash --baseline flex --out "$out/report" > /dev/null 2>&1
    python3 -m attnbench.devtools.grid_table "$out"/exact-d*/ --baseline sdpa-cudnn --baseline sdpa-flash --baseline flex \
        | tee "$out/grid.md"  # the README's table
}
check_run() {  # check_run NAME SECONDS [ARGS...]: `attnbench check ARGS` for at most SECONDS, every row into NAME.csv, its
               # output into NAME.txt; the last lines (the failures' count or "all checks passed") printed
    limit "$2" attnbench check "${@:3}" --csv "$out/$1.csv" > "$out/$1.txt" 2>&1
    tail -n 3 "$out/$1.txt"
}
model_steps() {  # model_steps RUNS [LEVELS [MECHANISMS [SECONDS]]]: GPT small's training step, triton against SDPA
                 # at T 1k and 4k, RUNS times (its spread); LEVELS comma-separated, taking turns within each run
    local levels=${2:-model} attn=${3:-standard} seconds=${4:-75}
    for run in $(seq "$1"); do
        for level in ${levels//,/ }; do
            speed "$seconds" --level "$level" --preset small --attn "$attn" --impl triton,sdpa --seq 1024 4096 --mode fwdbwd \
                --out "$out/$level-$run"
        done
    done
}
model_report() {  # the model-level runs' speedups over SDPA (model_steps' folders), into model-report/
    attnbench report "$out"/model-[0-9] "$out"/model-graph-[0-9] --baseline sdpa --out "$out/model-report" > /dev/null 2>&1
    sed -n '/^## Speedup over sdpa/,/^## Peak/p' "$out/model-report/report.md"
}
exposb_speed() {  # exposb_speed SECONDS: ExpoSB beside the standard kernel (triton), fwd and fwd+bwd, causal, D 64 and 128,
                  # T 1k-16k (EXPOSB_SEQS), SECONDS per head dim; the ratios
    for d in 64 128; do
        speed "$1" --attn standard,exposb --impl triton --tokens 16384 --seq ${EXPOSB_SEQS:-1024 4096 16384} --heads $((2048 / d)) --head-dim $d \
            --mode fwd --mode fwdbwd --causal --out "$out/exposb-d$d" > "$out/exposb-d$d.txt"
    done
    python3 -c "
import glob, pandas as pd
rows = pd.concat(pd.read_csv(f) for f in sorted(glob.glob('$out/exposb-d*/speed.csv')))
rows = rows[(rows.impl == 'triton') & (rows.status == 'ok')]
ms = rows.pivot_table(index=['head_dim', 'mode', 'seq'], columns='mechanism', values='ms_median')
print((ms['exposb'] / ms['standard']).round(2).rename('exposb / standard time').to_string())
" | tee "$out/exposb-ratios.txt"
}
TRAIN=(--task clm --preset small --steps 2000 --seq 512 --batch 8 --eval-every 200)
EXACT=(--attn standard --impl triton,sdpa-cudnn,sdpa-flash --tokens 16384 --seq 1024 2048 4096 8192 16384
       --mode fwd --mode fwdbwd --causal --bidirectional)

case $stage in
kernels)
    speed 120 --level model --preset small --attn standard --impl triton,sdpa --seq 1024 4096 --mode fwdbwd \
        --profile 5 --top 15 --out "$out/model-profile"
    speed 190 "${EXACT[@]}" --heads 16 --head-dim 128 --out "$out/exact-d128"
    speed 180 "${EXACT[@]}" --heads 32 --head-dim 64 --out "$out/exact-d64"
    speed 90 --attn window --impl triton,flex,fla --window 1024 --tokens 32768 --heads 16 --head-dim 128 \
        --seq 4096 8192 16384 32768 --mode fwd --mode fwdbwd --causal --out "$out/window"
    ;;
variants)
    speed 560 --attn standard,rope,alibi,exposb --impl triton,sdpa,flex --tokens 16384 --heads 16 --head-dim 128 \
        --seq 1024 2048 4096 8192 16384 --mode fwd --mode fwdbwd --causal --out "$out/variants"
    ;;
tests)  # every CUDA test (the fla impls against our references among them), `check` for exposb
    cuda_tests
    limit 60 attnbench check --attn exposb --max-seq 16384 --csv "$out/check.csv" > "$out/check.txt" 2>&1
    tail -5 "$out/check.txt"
    ;;
train)  # GPT small, #4's run (alone: training at batch 8 is launch-bound, contention halves it)
    limit 560 attnbench train --attn standard,rope,alibi,exposb "${TRAIN[@]}" --out "$out/gpt-small" > "$out/train.txt" 2>&1
    tail -4 "$out/train.txt"
    ;;
followup)  # what the sixth session's followup call left (H200): fla's NSA at GQA 16:1 (its 60 s
          # limit ended in the chunked series), and the H200 anchors for the linear-cost rows of
          # layers-followup/: exact softmax (cuDNN) and DeltaNet (fla) at the same shapes
    cp -r results/reference-h200/nsa-gqa "$out/nsa-gqa"
    speed 150 --resume --out "$out/nsa-gqa"
    speed 110 --level layer --attn standard,deltanet,linear,performer --impl sdpa-cudnn,fla,chunked --tokens 16384 \
        --heads 16 --head-dim 64 --seq 1024 4096 16384 65536 --mode fwd --causal --out "$out/layers-anchor"
    ;;
quality)  # every other mechanism with the settings of gpt-small/, one process each (#6): at batch 8
          # a step is launch-bound, so ten processes share the GPU with ~2.5x loss each; the CUDA
          # tests alongside (correctness only). window and nsa really sparse at T = 512 (window
          # 128, nsa top-2 blocks of 64); nsa through its definition (at T = 512 ~10x faster than
          # the chunked per-query block gathers)
    quality_run() {  # quality_run MECHANISM [OPTIONS...]
        limit 530 env OMP_NUM_THREADS=1 attnbench train --attn "$1" "${TRAIN[@]}" "${@:2}" --out "$out/$1" > "$out/$1.txt" 2>&1
    }
    for mechanism in linear performer block hopfield deltanet stickbreaking gau bsbr; do quality_run $mechanism & done
    quality_run window --window 128 &
    quality_run nsa --window 128 --option topn=2 --impl torch &
    cuda_tests
    wait
    for log in "$out"/*.txt; do echo "== $log"; tail -2 "$log"; done
    ;;
distill)  # #7: a standard teacher, then performer/linear/window/nsa students, then the fla tests
    limit 150 attnbench train --attn standard "${TRAIN[@]}" --eval-every 500 --out "$out/teacher" > "$out/teacher.txt" 2>&1
    limit 380 attnbench distill --teacher "$out/teacher" --teacher-attn standard --student performer \
        --student linear --student window --student nsa --window 128 --option topn=2 --steps 1000 --batch 8 \
        --lr 1e-4 --impl auto,nsa=torch --eval-every 100 --out "$out/distill" > "$out/distill.txt" 2>&1
    tail -12 "$out/distill.txt"
    fla_tests 200
    grep -E "PASSED|FAILED|Error:|error [0-9]" "$out/fla_tests.txt" | tail -30
    ;;
launch)  # #4: launches that skip triton's JITFunction.run (FlashKernel): the CUDA tests of the flash
        # kernels, the host time of one attention call, then GPT small's training step against
        # SDPA three times (its run-to-run spread is several percent)
    flash_tests 200 tests/bench/test_timing.py
    host_time --profile 25
    model_steps 3
    ;;
tiles)
    limit 120 python3 -m attnbench.devtools.tile_sweep --seq 1024 --seq 4096 --out "$out/tiles.csv" > "$out/tiles.txt" 2>&1
    tail -45 "$out/tiles.txt"
    ;;
tma)
    flash_tests 150 tests/bench/devtools/test_tile_sweep.py
    limit 280 python3 -m attnbench.devtools.tile_sweep --seq 1024 --seq 4096 --loads tma --loads pointer --out "$out/tiles.csv" > "$out/tiles.txt" 2>&1
    speed 70 --level model --preset small --attn standard --impl triton,sdpa --seq 1024 4096 --mode fwdbwd --out "$out/model"
    tail -70 "$out/tiles.txt"
    ;;
tma-followup)
    flash_tests 150 tests/bench/devtools/test_tile_sweep.py
    for d in 128 256; do
        limit 80 python3 -m attnbench.devtools.tile_sweep --seq 4096 --heads $((2048 / d)) --head-dim $d --no-neighbours \
            --loads tma --loads pointer --out "$out/tiles-d$d.csv" > "$out/tiles-d$d.txt" 2>&1
    done
    host_time
    model_steps 3
    cat "$out"/tiles-d*.txt
    ;;
tma-final)
    flash_tests 150 tests/bench/devtools/test_tile_sweep.py
    host_time --profile 25
    model_steps 3
    for d in 64 128; do
        speed 75 --attn standard --impl triton,sdpa-cudnn,sdpa-flash --tokens 16384 --seq 4096 16384 --mode fwd --mode fwdbwd \
            --causal --bidirectional --heads $((2048 / d)) --head-dim $d --out "$out/exact-d$d"
    done
    ;;
graph)  # a failed capture leaves its process's CUDA context unusable: the graph tests run apart
    limit 120 python3 -m pytest -v -m cuda tests/bench/speed/test_sweep.py tests/models/test_transformer.py --timeout 120 -rf \
        --tb=short > "$out/cuda_tests_graph.txt" 2>&1
    flash_tests 120
    grep -E "FAILED|passed|failed" "$out/cuda_tests_graph.txt" | tail -8
    model_steps 3 model-graph
    model_steps 1
    ;;
packed)
    flash_tests 130
    limit 80 python3 -m pytest -v -m cuda tests/bench/speed/test_sweep.py --timeout 60 -rf --tb=short > "$out/cuda_tests_sweep.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/cuda_tests_sweep.txt" | tail -4
    limit 40 python3 -m pytest -v tests/models/test_registry.py tests/kernels/test_flash.py -k "projection" \
        --tb=short > "$out/projection_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/projection_tests.txt" | tail -4
    model_steps 2 model-graph standard,rope,alibi 100
    model_steps 1 model standard,rope,alibi 100
    ;;
rope)
    flash_tests 130
    limit 40 python3 -m pytest -v tests/models/test_registry.py tests/kernels/test_flash.py -k "projection" \
        --tb=short > "$out/projection_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/projection_tests.txt" | tail -4
    speed 120 --attn standard,rope --impl triton,sdpa --tokens 16384 --heads 16 --head-dim 128 --seq 4096 16384 \
        --mode fwd --mode fwdbwd --causal --out "$out/variants"
    model_steps 1 model-graph standard,rope,alibi 100
    model_steps 1 model standard,rope,alibi 100
    ;;
rope-epilogue)
    flash_tests 130
    speed 120 --attn standard,rope --impl triton,sdpa --tokens 16384 --heads 16 --head-dim 128 --seq 4096 16384 \
        --mode fwd --mode fwdbwd --causal --out "$out/variants"
    model_steps 1 model-graph standard,rope 100
    ;;
rope-check)
    limit 60 python3 -m pytest -v tests/kernels/test_flash.py -k "rope or fused or everything" --tb=short \
        > "$out/rope_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/rope_tests.txt" | tail -4
    check_run check-rope 100 --attn rope --max-seq 4096 --dtype bf16
    ;;
final)
    check_run check-rope 100 --attn rope --max-seq 4096 --dtype bf16
    model_steps 2 model-graph standard,rope,alibi 100
    model_steps 2 model standard,rope,alibi 100
    ;;
host)
    flash_tests 150
    host_time --profile 25
    model_steps 2
    model_steps 1 model-graph
    ;;
check)
    for dtype in bf16 fp16; do
        check_run "check-$dtype" 100 --attn standard,rope,alibi,window --max-seq 4096 --dtype $dtype
    done
    ;;
lean)
    flash_tests 150 tests/bench/devtools/test_tile_sweep.py
    limit 250 python3 -m attnbench.devtools.tile_sweep --seq 1024 --seq 4096 --out "$out/tiles.csv" > "$out/tiles.txt" 2>&1
    model_steps 1 model-graph standard 100
    tail -64 "$out/tiles.txt"
    ;;
edges | registers)  # the same steps, on two states of the kernels
    flash_tests 150 tests/bench/devtools/test_tile_sweep.py
    limit 120 python3 -m attnbench.devtools.tile_sweep --seq 1024 --seq 4096 --out "$out/tiles.csv" > "$out/tiles.txt" 2>&1
    model_steps 2 model-graph standard,rope,alibi 100
    model_steps 1 model standard 80
    tail -64 "$out/tiles.txt"
    ;;
registers-check)
    limit 120 python3 -m pytest -v -m cuda tests/bench/devtools/test_tile_sweep.py tests/kernels/test_flash_launch.py --timeout 120 -rf \
        --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/cuda_tests.txt" | tail -4
    check_run check-bf16 200 --attn standard,rope,alibi,window --max-seq 4096 --dtype bf16
    ;;
registers-grid)
    for d in 64 128; do
        speed 90 --attn standard --impl triton,sdpa-cudnn,sdpa-flash --tokens 16384 --seq 4096 16384 --mode fwd --mode fwdbwd \
            --causal --bidirectional --heads $((2048 / d)) --head-dim $d --out "$out/exact-d$d"
    done
    speed 120 --attn standard,rope --impl triton,sdpa --tokens 16384 --heads 16 --head-dim 128 --seq 4096 16384 \
        --mode fwd --mode fwdbwd --causal --out "$out/variants"
    ;;
alibi-float)
    flash_tests 110
    model_steps 1 model-graph standard,rope,alibi 100
    ;;
layers)
    speed 490 --level layer --attn all --impl all --seq 1024 4096 16384 65536 --mode fwd --out "$out/layers"
    speed 70 --level model --preset small --attn standard --impl triton,sdpa --seq 1024 4096 --mode fwdbwd --out "$out/model"
    ;;
decode)
    limit 150 python3 -m pytest -v tests/kernels/test_decode_kernel.py tests/kernels/test_state_decode.py tests/models/test_decode.py \
        --timeout 120 -rf --tb=short > "$out/decode_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/decode_tests.txt" | tail -6
    limit 170 python3 -m attnbench.kernels.bench_decode --out "$out/decode.csv" > "$out/decode.txt" 2>&1
    tail -40 "$out/decode.txt"
    limit 170 python3 -m attnbench.kernels.bench_decode --cuda-graph --out "$out/decode-graph.csv" > "$out/decode-graph.txt" 2>&1
    tail -40 "$out/decode-graph.txt"
    ;;
sparse)
    limit 330 python3 -m pytest -v -m cuda tests/kernels tests/models --timeout 150 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | tail -25
    limit 200 python3 -m attnbench.kernels.bench_block_sparse --seq 4096 16384 --out "$out/block_sparse.csv" > "$out/block_sparse.txt" 2>&1
    tail -45 "$out/block_sparse.txt"
    ;;
sparse-list)
    limit 170 python3 -m pytest -v tests/kernels/test_block_sparse.py tests/kernels/test_flash.py --timeout 150 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | tail -15
    for block in 64 128; do
        limit 150 python3 -m attnbench.kernels.bench_block_sparse --seq 4096 16384 --block $block --out "$out/block_sparse_$block.csv" > "$out/block_sparse_$block.txt" 2>&1
        tail -34 "$out/block_sparse_$block.txt"
    done
    ;;
decode-peers)
    limit 150 python3 -m pytest -v tests/models/test_decode_forms.py tests/models/test_generate.py tests/bench/speed/test_decode_mode.py \
        --timeout 120 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | tail -8
    speed 300 --mode decode --attn standard,linear,deltanet,performer --impl all --heads 32 --kv-heads 8 --head-dim 128 \
        --batch 1 32 --context 1024 16384 65536 --out "$out/decode" > "$out/decode.txt"
    python3 - "$out" <<'PY'
import csv, sys
for r in csv.DictReader(open(f"{sys.argv[1]}/decode/speed.csv")):
    print(r["mechanism"], r["impl"], r["batch"], r["seq"], r["status"], r["ms_median"], r["pct_bandwidth"], r["message"][:80])
PY
    ;;
decode-model)  # #24's decode with every peer: SDPA pinned to cuDNN and flash, flex, fla's fused_recurrent steps (MHA:
              # fla takes one head count), then GPT small's whole decode step at the model level
    limit 130 python3 -m pytest -v tests/models/test_decode_forms.py tests/models/test_generate.py tests/models/test_fla_decode.py \
        tests/bench/speed/test_decode_mode.py tests/kernels/test_decode_kernel.py tests/kernels/test_state_decode.py \
        --timeout 120 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | tail -8
    speed 190 --mode decode --attn standard,linear,deltanet,performer,gau --impl all --heads 32 --kv-heads 8 --head-dim 128 \
        --batch 1 8 32 64 --context 1024 4096 16384 65536 --out "$out/decode" > "$out/decode.txt"
    speed 45 --mode decode --attn linear,deltanet --impl all --heads 32 --kv-heads 32 --head-dim 128 \
        --batch 1 32 --context 1024 --out "$out/decode-mha" > "$out/decode-mha.txt"
    speed 170 --mode decode --level model --preset small --attn standard,linear,deltanet,performer,gau --impl torch,triton \
        --batch 1 8 32 64 --context 1024 4096 16384 65536 --out "$out/model" > "$out/model.txt"
    attnbench report "$out/decode" --out "$out/report" > /dev/null 2>&1
    python3 - "$out" <<'PY'
import csv, sys
for run in ("decode", "decode-mha", "model"):
    for r in csv.DictReader(open(f"{sys.argv[1]}/{run}/speed.csv")):
        if r["status"] != "ok":
            print(run, r["mechanism"], r["impl"], r["batch"], r["seq"], r["status"], r["message"][:70])
        elif r["batch"] in ("1", "32") or run == "model":
            print(run, r["mechanism"], r["impl"], r["batch"], r["seq"], r["ms_median"], r["tokens_per_s"], r["pct_bandwidth"], r["cuda_graph"])
PY
    ;;
decode-tune)  # #24's decode kernel: every tile and split count beside cuDNN (CUDA-graph replays), then Nsight Compute
              # on the default split kernel at B 1 and 32, L 16k (what limits it)
    limit 330 python3 -m attnbench.devtools.decode_tiles --out "$out/tiles.csv" --batch 1 32 --context 1024 16384 65536 > "$out/tiles.txt" 2>&1
    tail -8 "$out/tiles.txt"
    for b in 1 32; do
        limit 90 ncu --clock-control none -k regex:_split_kernel --launch-skip 3 --launch-count 1 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
            python3 -c "
import torch
from attnbench.kernels.decode import decode_attention
q = torch.randn($b, 1, 32, 128, device='cuda', dtype=torch.bfloat16)
k, v = (torch.randn($b, 16384, 8, 128, device='cuda', dtype=torch.bfloat16) for _ in range(2))
lengths = torch.full(($b,), 16384, dtype=torch.int32, device='cuda')
for _ in range(5):
    decode_attention(q, k, v, lengths)
torch.cuda.synchronize()
" > "$out/ncu-b$b.txt" 2>&1
        grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size|Block Limit|Warp Cycles Per Issued|Stall|Theoretical Occ" "$out/ncu-b$b.txt" | head -16
    done
    ;;
serve)  # #24's last pieces: packed varlen prefill/training beside flex and SDPA (and our dense kernel at the same
       # tokens), the decode kernel after decode-tune beside cuDNN, GPT small's decode step as a CUDA graph, bsbr/nsa steps
    limit 150 python3 -m pytest -v tests/kernels/test_flash_varlen.py tests/models/test_varlen.py tests/models/test_decode.py \
        tests/models/test_generate.py tests/models/test_fla_decode.py tests/bench/speed/test_decode_mode.py tests/kernels/test_decode_kernel.py \
        -m cuda --timeout 120 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | tail -10
    speed 120 --attn standard --impl triton,flex,sdpa,sdpa-cudnn,sdpa-flash --lengths uniform:256-4096 --tokens 16384 \
        --heads 16 --head-dim 128 --mode fwd --mode fwdbwd --causal --out "$out/varlen" > "$out/varlen.txt"
    speed 60 --attn standard --impl triton,flex --tokens 16384 --seq 2048 4096 --heads 16 --head-dim 128 --mode fwd --mode fwdbwd \
        --causal --out "$out/dense" > "$out/dense.txt"
    speed 90 --mode decode --attn standard --impl triton,triton-paged,sdpa-cudnn --heads 32 --kv-heads 8 --head-dim 128 \
        --batch 1 8 32 64 --context 1024 4096 16384 65536 --out "$out/decode" > "$out/decode.txt"
    speed 120 --mode decode --level model-graph --preset small --attn standard,linear,deltanet,performer,nsa,gau,bsbr --impl torch,triton \
        --batch 1 8 32 64 --context 1024 4096 16384 65536 --out "$out/model-graph" > "$out/model-graph.txt"
    speed 30 --mode decode --attn bsbr,nsa --impl torch --heads 32 --kv-heads 8 --head-dim 128 --batch 1 32 --context 1024 16384 \
        --out "$out/sparse" > "$out/sparse.txt"
    python3 - "$out" <<'PY'
import csv, os, sys
for run in ("varlen", "dense", "decode", "model-graph", "sparse"):
    path = f"{sys.argv[1]}/{run}/speed.csv"
    for r in csv.DictReader(open(path)) if os.path.exists(path) else []:
        if r["status"] != "ok":
            print(run, r["mechanism"], r["impl"], r["batch"], r["seq"], r["mode"], r["status"], r["message"][:70])
        else:
            print(run, r["mechanism"], r["impl"], r["batch"], r["seq"], r["mode"], r["ms_median"], r["tflops"], r["tokens_per_s"], r["pct_bandwidth"])
PY
    ;;
varlen)  # #24's packed varlen after serve (its backward without TMA): the CUDA tests, then the pack beside flex and SDPA
    limit 150 python3 -m pytest -v tests/kernels/test_flash_varlen.py tests/models/test_varlen.py -m cuda --timeout 120 -rf --tb=short \
        > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | tail -10
    speed 150 --attn standard --impl triton,flex,sdpa,sdpa-flash --lengths uniform:256-4096 --tokens 16384 \
        --heads 16 --head-dim 128 --mode fwd --mode fwdbwd --causal --out "$out/varlen" > "$out/varlen.txt"
    python3 - "$out" <<'PY'
import csv, sys
for r in csv.DictReader(open(f"{sys.argv[1]}/varlen/speed.csv")):
    print(r["impl"], r["batch"], r["seq"], r["mode"], r["status"], r["ms_median"], r["tflops"], r["message"][:70])
PY
    ;;
defaults)  # results/ of each default command lands in $out (their run folders are named by the time)
    (cd "$out" && limit 400 bash -c 'time attnbench train --attn rope' > "$out/train.txt" 2>&1)
    grep -v "━" "$out/train.txt" | tail -12
    (cd "$out" && limit 150 bash -c 'time attnbench speed --seq 512 4096' > "$out/speed.txt" 2>&1)
    grep -v "━" "$out/speed.txt" | tail -30
    ;;
grid)
    common=(--preset small --seq 512 --steps 2000 --batch 4 --eval-every 250 --eval-batches 8)
    for form in standard linear topk window block; do
        for scheme in sinusoidal rope alibi; do
            args=(--attn "$form" --positions "$scheme" --task clm "${common[@]}" --out "$out/grid/$form-$scheme")
            [[ $form != window ]] || args+=(--window 128)
            limit 520 attnbench train "${args[@]}" > "$out/grid-$form-$scheme.txt" 2>&1 &
        done
    done
    [[ -z ${BERT:-} ]] || bert "${common[@]}"
    wait
    attnbench report "$out"/grid/* --out "$out/grid-report" > /dev/null 2>&1
    for f in "$out"/grid-*.txt; do echo "$(basename "$f"): $(grep -v "━" "$f" | tail -1)"; done
    grep -A20 "| mechanism" "$out/grid-report/train_report.md" | head -22
    [[ -z ${BERT:-} ]] || bert_report
    ;;
gate)
    check_run window-schemes 170 --attn standard,window --positions rope,alibi --window 256 --max-seq 4096
    check_run all 200 --attn all --max-seq 2048
    (cd "$out" && limit 60 attnbench speed --attn standard --seq 1024 4096 --mode fwd --mode fwdbwd --check --out "$out/speed-check" > "$out/speed-check.txt" 2>&1)
    python3 - "$out" <<'PY'
import csv, collections, sys
for name in ("window-schemes", "all"):
    try:
        rows = list(csv.DictReader(open(f"{sys.argv[1]}/{name}.csv")))
    except OSError:
        continue
    print(name, dict(collections.Counter(r["status"] for r in rows)))
    for r in rows:
        if r["status"] in ("fail", "error", "oom"):
            print("  ", r["case"], r["output"], r["status"], r["ratio"], r["message"][:120])
rows = list(csv.DictReader(open(f"{sys.argv[1]}/speed-check/speed.csv")))
for r in rows:
    print(r["impl"], r["seq"], r["mode"], r["status"], r["check"], r["ms_median"])
PY
    ;;
learned)  # #23: distilled into learned (three L1 strengths) and nsa/window/performer/linear
    limit 100 attnbench train --attn standard --task clm ${TEACHER:-} --out "$out/teacher" > "$out/teacher.txt" 2>&1
    tail -2 "$out/teacher.txt"
    common=(--teacher "$out/teacher" --steps "${STEPS:-1000}" --batch 8 --lr 1e-4 --eval-every "${EVAL_EVERY:-100}" ${DISTILL:-})
    limit 360 attnbench distill "${common[@]}" --student learned --mask-l1 "${MASK_L1:-0.001,0.01,0.1}" --out "$out/learned" > "$out/learned.txt" 2>&1 &
    limit 360 attnbench distill "${common[@]}" --student nsa,window,performer,linear --window 128 --option topn=2 \
        --impl auto,nsa=torch --out "$out/others" > "$out/others.txt" 2>&1 &
    wait
    for run in learned others; do  # again on a quiet GPU: every student is at its last step, so only the costs,
        # the layer timings (scale.csv), densities, edge cases and generations are measured anew
        limit 90 attnbench distill --resume --out "$out/$run" --config "$out/$run/config.toml" > "$out/$run-costs.txt" 2>&1
        tail -1 "$out/$run-costs.txt"
    done
    attnbench report "$out/learned" "$out/others" --out "$out/report" > /dev/null 2>&1
    # where a learned layer's time goes next to the dense one (random weights: every gate open)
    speed 60 --level layer --attn learned,standard --impl triton --tokens 65536 --seq 4096 16384 --mode fwd --profile 20 \
        --out "$out/layer-profile" | grep -E -A12 "wall|busy" | head -60
    python3 - "$out" <<'PY'
import csv, sys
for run in ("learned", "others"):
    for r in csv.DictReader(open(f"{sys.argv[1]}/{run}/summary.csv")):
        print(run, r["student"] or "teacher", r["impl"], r["kl_zero_shot"], r["kl"], r["agreement"], r["ppl"], r["density"], r["status"])
    for r in csv.DictReader(open(f"{sys.argv[1]}/{run}/scale.csv")):
        print("  ", r["model"], r["impl"], r["seq"], r["forward_ms"], r["peak_mem_mib"], r["density"], r["status"])
PY
    ;;
serve-final)  # #24's reference run (see the header): decode kernels, fla's state steps, model-graph decode, varlen
    speed 170 --mode decode --attn standard,linear,deltanet --impl triton,triton-paged,sdpa-cudnn,sdpa-flash,torch \
        --heads 32 --kv-heads 8 --head-dim 128 --batch 1 8 32 64 --context 1024 4096 16384 65536 --out "$out/decode" > "$out/decode.txt"
    attnbench report "$out/decode" --out "$out/report" > /dev/null 2>&1
    speed 50 --mode decode --attn linear,deltanet --impl all --heads 32 --kv-heads 32 --head-dim 128 \
        --batch 1 32 --context 1024 --out "$out/decode-mha" > "$out/decode-mha.txt"
    speed 110 --attn standard --impl triton,flex,sdpa,sdpa-flash --lengths uniform:256-4096 --tokens 16384 \
        --heads 16 --head-dim 128 --mode fwd --mode fwdbwd --causal --out "$out/varlen" > "$out/varlen.txt"
    speed 50 --attn standard --impl triton --tokens 16384 --seq 2048 4096 --heads 16 --head-dim 128 --mode fwd --mode fwdbwd \
        --causal --out "$out/dense" > "$out/dense.txt"
    speed 170 --mode decode --level model-graph --preset small --attn standard,linear,deltanet,performer,gau,bsbr --impl torch,triton \
        --batch 1 8 32 64 --context 1024 4096 16384 65536 --out "$out/model-graph" > "$out/model-graph.txt"
    python3 - "$out" <<'PY'
import csv, os, sys
for run in ("decode", "decode-mha", "varlen", "dense", "model-graph"):
    path = f"{sys.argv[1]}/{run}/speed.csv"
    for r in csv.DictReader(open(path)) if os.path.exists(path) else []:
        if r["status"] != "ok":
            print(run, r["mechanism"], r["impl"], r["batch"], r["seq"], r["mode"], r["status"], r["message"][:60])
        elif run != "decode" or r["batch"] in ("1", "32"):
            print(run, r["mechanism"], r["impl"], r["batch"], r["seq"], r["mode"], r["ms_median"], r["tflops"], r["pct_bandwidth"], r["cuda_graph"])
PY
    ;;
short-tiles)  # #25: every flash tile at short T beside cuDNN (the kernels' lists below 4k are the first choice, untuned)
    for d in 64 128; do
        limit 270 python3 -m attnbench.devtools.tile_sweep --seq 512 --seq 1024 --seq 2048 --heads 16 --head-dim $d \
            --out "$out/tiles-d$d.csv" > "$out/tiles-d$d.txt" 2>&1
        python3 - "$out/tiles-d$d.csv" <<'PY'
import sys
import pandas as pd
rows = pd.read_csv(sys.argv[1]).dropna(subset=["ms"])
for (seq, kernel), group in rows.groupby(["seq", "kernel"]):
    best = group.nsmallest(3, "ms")
    print(seq, kernel, " | ".join(f"{r.block_m}x{r.block_n} w{r.warps} s{r.stages} r{r.max_registers}: {r.ms:.4f}" for r in best.itertuples()))
PY
    done
    ;;
learned-causal)  # see the header; EVAL_EVERY=100 DISTILL="--eval-batches 4" as `learned` ran
    limit 100 attnbench train --attn standard --task clm --out "$out/teacher" > "$out/teacher.txt" 2>&1
    tail -2 "$out/teacher.txt"
    limit 330 attnbench distill --teacher "$out/teacher" --steps 1000 --batch 8 --lr 1e-4 --eval-every 100 --eval-batches 4 \
        --student learned --mask-l1 0.001,0.01,0.1 --out "$out/learned" > "$out/learned.txt" 2>&1
    limit 90 attnbench distill --resume --out "$out/learned" --config "$out/learned/config.toml" > "$out/learned-costs.txt" 2>&1
    tail -1 "$out/learned-costs.txt"
    python3 - "$out" <<'PY'
import csv, sys
for r in csv.DictReader(open(f"{sys.argv[1]}/learned/summary.csv")):
    print(r["student"] or "teacher", r["impl"], r["kl_zero_shot"], r["kl"], r["agreement"], r["ppl"], r["density"], r["status"])
for r in csv.DictReader(open(f"{sys.argv[1]}/learned/scale.csv")):
    print("  ", r["model"], r["impl"], r["seq"], r["forward_ms"], r["density"], r["status"])
PY
    ;;
exposb-prepass)  # #25's ExpoSB prepass (see the header)
    limit 200 python3 -m pytest -q -m cuda tests/kernels/test_exposb_kernel.py tests/kernels/test_decode_kernel.py tests/models \
        -k exposb --timeout 180 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|passed|failed" "$out/cuda_tests.txt" | tail -8
    for d in 64 128; do
        speed 150 --attn standard,exposb --impl triton --tokens 16384 --seq 1024 4096 16384 --heads $((2048 / d)) --head-dim $d \
            --mode fwd --mode fwdbwd --causal --out "$out/speed-d$d" > "$out/speed-d$d.txt"
        grep -E "exposb|standard" "$out/speed-d$d.txt" | tail -16
    done
    ;;
hopper-fwd)  # #25's Hopper forward (see the header)
    hopper_smoke
    flash_tests 200 tests/kernels/test_flash_fwd_hopper.py
    hopper_sweep
    ;;
pingpong)  # #25's Hopper forward as two consumer partitions (see the header)
    hopper_smoke
    flash_tests 150 tests/kernels/test_flash_fwd_hopper.py -k hopper
    hopper_sweep
    hopper_ncu flash_fwd_hopper
    hopper_ncu flash_fwd_kernel
    ;;
hopper-tiles)  # #25's Hopper forward at D 64 with three consumers or two (see the header)
    hopper_smoke
    flash_tests 150 tests/kernels/test_flash_fwd_hopper.py -k hopper
    SWEEP_S=100 hopper_sweep
    ;;
exact-grid)  # #25's must-show exact-softmax grid (see the header; EXACT_DIMS: the head dims, default 64 128)
    exact_grid ${EXACT_DIMS:-64 128}
    ;;
plans)  # #25's Hopper forward with a plan per head dim and mask (see the header)
    hopper_smoke
    flash_tests 170 -k hopper
    exact_grid 64
    ;;
must-show)  # #25's must-show: ExpoSB's CUDA tests, ExpoSB beside standard, the model-level steps eager and graph (see the header)
    exposb_tests 95 tests/bench/devtools/test_exposb_tile_sweep.py
    exposb_speed 72
    model_steps 3 model-graph,model standard 52
    model_report
    ;;
model-steps)  # #25's must-show model-level step alone (see the header)
    model_steps 3 model-graph,model standard "${STEP_S:-52}"
    model_report
    ;;
exposb-profile)  # #25's ExpoSB tile sweep and ncu, the Hopper forward's short-T ncu, `check` (see the header)
    exposb_sweep 90 128 causal
    exposb_sweep 90 64 causal
    exposb_ncu 4 4096 16 128
    hopper_ncu flash_fwd_hopper 32 512 16 128  # what the Hopper forward's short-T cost is (PERF_NOTES 16)
    hopper_ncu flash_fwd_kernel 32 512 16 128
    check_run check 120 --attn standard,rope,alibi,window,exposb --max-seq 4096
    ;;
short-ncu)  # #25's short-T forward in its new order, and the variants' check (see the header)
    hopper_ncu flash_fwd_hopper 32 512 16 128
    hopper_ncu flash_fwd_kernel 32 512 16 128
    check_run check 400 --attn alibi,window,exposb --impl triton --max-seq 4096
    ;;
persistent-heads)  # #25's Hopper forward's persistent head-by-head schedule (see the header)
    SWEEP_S=55 hopper_sweep 128 64
    flash_tests 150 -k hopper
    ;;
pairs)  # #25's Hopper forward's paired work groups (see the header)
    hopper_smoke
    flash_tests 150 -k "other_schedules and pairs"
    MASKS=causal SWEEP_S=75 hopper_sweep 128 64
    ;;
pair-plans)  # #25's Hopper forward with paired causal plans (see the header)
    hopper_smoke
    flash_tests 210 -k hopper
    host_time --seq 512 --calls 300 && mv "$out/host.txt" "$out/host-512.txt"  # D 64 causal: the Hopper forward
    host_time --seq 128 --calls 300  # the portable forward
    exact_grid ${EXACT_DIMS:-128}
    ;;
pair-steps)  # #25's D 64 grid and model-level step after pair-plans (see the header)
    exact_grid 64
    model_steps 3 model-graph,model standard "${STEP_S:-45}"
    model_report
    ;;
steps-dkdv)  # #25's pair-steps, then dk/dv's and the new tiles' CUDA tests and dk/dv's timing in what is left (see the header)
    exact_grid 64
    model_steps 3 model-graph,model standard "${STEP_S:-45}"
    model_report
    flash_tests 150 -k "hopper_dkdv or tiles_match" tests/kernels/test_flash_dkdv_hopper.py
    dkdv_timing 100
    ;;
h200-grid)  # #25's dk/dv tiles, D 128 grid and causal sweep on the H200 (see the header)
    flash_tests 110 -k hopper_dkdv tests/kernels/test_flash_dkdv_hopper.py
    dkdv_timing 120
    exact_grid 128
    dkdv_ncu
    MASKS=causal SWEEP_S=60 hopper_sweep 128 64
    ;;
dkdv-keys)  # #25's Gluon dk/dv kernel under each of its tiles (see the header)
    flash_tests 100 -k hopper_dkdv tests/kernels/test_flash_dkdv_hopper.py
    dkdv_timing 120
    dkdv_ncu
    ;;
dkdv-per-sm)  # #25's Gluon dk/dv kernel and the forward's one-consumer tiles (see the header)
    hopper_smoke
    flash_tests 220 -k hopper tests/kernels/test_flash_dkdv_hopper.py
    dkdv_timing 100
    MASKS=causal SWEEP_S=70 hopper_sweep 128 64
    ;;
deeper-rings)  # #25's D 128 Hopper forward's deeper rings (see the header)
    SWEEP_S=80 hopper_sweep 128
    flash_tests 80 -k tiles_match
    check_run check 120 --attn standard --impl triton
    ;;
exposb-tiles)  # #25's ExpoSB with the sweep's tiles, the Hopper forward's schedules (see the header)
    hopper_smoke  # first: the standard rows at D 128 from 4k keys run the Hopper forward
    exposb_speed "${EXPOSB_S:-60}"
    exposb_tests 90
    flash_tests 70 tests/kernels/test_flash_fwd_hopper.py -k hopper  # every schedule, head by head included (56 s on an H100)
    SWEEP_S=45 hopper_sweep 128 64  # head by head may lift D 64 at short T too (its bytes, not its exponentials, bound T 512)
    exposb_sweep 95 128 bidirectional  # the causal one ran in exposb-profile; gets what is left
    ;;
short-check)  # #25 after short-tiles (see the header)
    flash_tests 200 tests/kernels/test_flash_varlen.py tests/kernels/test_block_sparse.py
    for d in 128 64; do
        speed 100 --attn standard --impl triton,sdpa-cudnn --tokens 16384 --seq 512 1024 2048 4096 --heads 16 --head-dim $d \
            --mode fwd --mode fwdbwd --causal --bidirectional --out "$out/grid-d$d" > "$out/grid-d$d.txt"
    done
    limit 60 attnbench speed --seq 512 4096 --out "$out/defaults" > "$out/defaults.txt" 2>&1
    speed 70 --mode decode --attn deltanet --impl triton,fla --heads 32 --kv-heads 32 --head-dim 128 \
        --batch 1 32 --context 1024 --out "$out/decode-mha" > "$out/decode-mha.txt"
    for impl in triton cudnn; do  # the default sweep's T = 512 row: B 32, H 16, D 64, causal
        limit 45 ncu --clock-control none -k regex:"flash_fwd|cudnn|fmha|sm90" --launch-skip 5 --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
            python3 -c "
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from attnbench.kernels.flash import flash_attention
q, k, v = (torch.randn(32, 512, 16, 64, device='cuda', dtype=torch.bfloat16) for _ in range(3))
for _ in range(8):
    if '$impl' == 'triton':
        flash_attention(q, k, v, causal=True)
    else:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
torch.cuda.synchronize()
" > "$out/ncu-$impl.txt" 2>&1
        grep -E "  [a-z_].*\(|Duration|Compute \(SM\) Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Grid Size|Block Size|Warp Cycles Per Issued|Theoretical Occ|Waves Per SM" "$out/ncu-$impl.txt" | head -14
    done
    python3 - "$out" <<'PY'
import csv, os, sys
for run in ("grid-d128", "grid-d64", "decode-mha"):
    path = f"{sys.argv[1]}/{run}/speed.csv"
    rows = list(csv.DictReader(open(path))) if os.path.exists(path) else []
    ms = {(r["impl"], r["seq"], r["mode"], r["causal"]): r["ms_median"] for r in rows if r["status"] == "ok"}
    for (impl, seq, mode, causal), t in sorted(ms.items()):
        peer = ms.get(("sdpa-cudnn", seq, mode, causal)) if impl == "triton" and run != "decode-mha" else None
        print(run, impl, seq, mode, causal, t, f"cudnn/ours {float(peer) / float(t):.3f}" if peer else "")
PY
    ;;
decode-cli)  # #24 through `attnbench speed --mode decode`, and #25's custom ops: CUDA tests, the decode sweep at
            # the issue's shapes, host time per attention call (eager and torch.compile)
    limit 150 python3 -m pytest -v tests/kernels/test_flash_ops.py tests/models/test_decode_forms.py tests/bench/speed/test_decode_mode.py \
        tests/kernels/test_decode_kernel.py tests/kernels/test_state_decode.py --timeout 120 -rf --tb=short > "$out/cuda_tests.txt" 2>&1
    grep -E "FAILED|ERROR|passed|failed" "$out/cuda_tests.txt" | tail -8
    speed 240 --mode decode --attn standard,linear,deltanet --impl all --heads 32 --kv-heads 8 --head-dim 128 \
        --batch 1 8 32 64 --context 1024 4096 16384 65536 --out "$out/decode" > "$out/decode.txt"
    limit 90 python3 -m attnbench.devtools.host_overhead --impl triton --impl sdpa --compiled > "$out/host.txt" 2>&1
    grep -E "per forward|compiled" "$out/host.txt" | head
    python3 - "$out" <<'PY'
import csv, sys
for r in csv.DictReader(open(f"{sys.argv[1]}/decode/speed.csv")):
    if r["batch"] in ("1", "32") and r["status"] == "ok":
        print(r["mechanism"], r["impl"], r["batch"], r["seq"], r["ms_median"], r["gbps"], r["pct_bandwidth"], r["cuda_graph"])
    elif r["status"] != "ok":
        print(r["mechanism"], r["impl"], r["batch"], r["seq"], r["status"], r["message"][:80])
PY
    ;;
bert)
    bert --preset small --seq 512 --steps 2000 --batch 4 --eval-every 250 --eval-batches 8
    wait
    bert_report
    ;;
esac
