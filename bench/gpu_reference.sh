#!/usr/bin/env bash
# The reference GPU runs committed under results/ (see results/README.md), one stage per
# device call. Usage: bash bench/gpu_reference.sh STAGE OUT_DIR  (all output: OUT_DIR/STAGE.tgz)
#   kernels: issue-2 harness cross-check, the exact-family grid, exposb, window scaling, `attnbench check`
#   layers:  every mechanism at layer level to T = 64k, model-level speed, the CUDA-marked tests
set -uo pipefail
stage=$1 dest=$2
out=$(mktemp -d)
trap 'tar czf "$dest/$stage.tgz" -C "$out" .' EXIT
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/pip.log" 2>&1 || { tail "$out/pip.log"; exit 1; }
if ls .whl/*.whl > /dev/null 2>&1; then  # optional peers (fla-core) carried as wheels
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit --format=csv | tee "$out/gpu.txt"
speed() { timeout "$1" attnbench speed "${@:2}" --measure-peak 2>&1 | tail -60; }

case $stage in
kernels)
    speed 90 --seq 512 4096 --impl all --mode fwd --out "$out/harness"
    timeout 40 python3 -m attnbench.crosscheck "$out/harness" | tee "$out/crosscheck.txt"
    speed 130 --attn standard --impl triton,sdpa-cudnn,sdpa-flash,flex --tokens 16384 --heads 16 --head-dim 128 \
        --seq 1024 4096 16384 --mode fwd --mode fwdbwd --causal --bidirectional --out "$out/exact"
    speed 100 --attn rope,alibi,exposb --impl triton,sdpa,flex --tokens 16384 --heads 16 --head-dim 128 \
        --seq 4096 16384 --mode fwd --mode fwdbwd --causal --out "$out/variants"
    speed 60 --attn window --impl triton,flex,fla --window 1024 --tokens 32768 --heads 16 --head-dim 128 \
        --seq 4096 8192 16384 32768 --mode fwd --mode fwdbwd --causal --out "$out/window"
    timeout 90 attnbench check --attn standard,rope,alibi,window,exposb --max-seq 16384 2>&1 | tail -40 | tee "$out/check.txt"
    ;;
layers)  # also: the kernels stage's cross-check and flex rows, redone after their fixes
    timeout 30 python3 -m attnbench.crosscheck results/reference-h100/harness | tee "$out/crosscheck.txt"
    speed 170 --level layer --attn all --impl all --seq 1024 4096 16384 65536 --mode fwd --out "$out/layers"
    speed 70 --attn standard --impl flex --tokens 16384 --heads 16 --head-dim 128 \
        --seq 1024 4096 16384 --mode fwd --mode fwdbwd --causal --bidirectional --out "$out/exact-flex"
    speed 50 --level model --preset small --attn standard --impl triton,sdpa --seq 1024 4096 --mode fwdbwd --out "$out/model"
    timeout 80 python3 -m pytest -q -m cuda tests 2>&1 | tail -15 | tee "$out/cuda_tests.txt"
    ;;
esac
