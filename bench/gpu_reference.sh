#!/usr/bin/env bash
# The reference GPU runs committed under results/ (see results/README.md), one stage per
# device call (each under its 10-minute limit). Usage: bash bench/gpu_reference.sh STAGE OUT_DIR
# (all output: OUT_DIR/STAGE.tgz; every step has its own time limit inside the stage's budget).
#   kernels:  a model-level profile, the exact-family grid (D 64 and 128), sliding-window scaling
#   train:    GPT small with standard/rope/alibi/exposb (then distilled) while `check` and the
#             CUDA-marked tests share the GPU (correctness only; the training runs' tokens/s
#             are therefore not reference speeds: the model level of `speed` is)
#   sweeps:   rope/alibi/exposb against their peers, every mechanism at layer level to 64k,
#             model-level speed
set -uo pipefail
stage=$1 dest=$2
out=$(mktemp -d)
trap 'tar czf "$dest/$stage.tgz" -C "$out" .' EXIT
deadline=$((SECONDS + ${BUDGET_S:-575}))
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/pip.log" 2>&1 || { tail "$out/pip.log"; exit 1; }
if ls .whl/*.whl > /dev/null 2>&1; then  # optional peers (fla-core) carried as wheels
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit --format=csv | tee "$out/gpu.txt"

limit() {  # limit SECONDS CMD...: run CMD for at most SECONDS, and never past the stage's deadline
    local left=$((deadline - SECONDS)); local t=$(($1 < left ? $1 : left))
    if ((t <= 5)); then echo "skipped (stage budget spent): ${*:2}" | tee -a "$out/skipped.txt"; return 0; fi
    timeout "$t" "${@:2}" || echo "exit $? after at most ${t}s: ${*:2}" | tee -a "$out/skipped.txt"
}
speed() { limit "$1" attnbench speed "${@:2}" --measure-peak 2>&1 | tail -80; }
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
train)
    (
        limit 390 attnbench train --attn standard,rope,alibi,exposb --task clm --preset small --steps 2000 --seq 512 \
            --eval-every 200 --out "$out/gpt-small" 2>&1 | tail -30
        limit 600 attnbench distill --teacher "$out/gpt-small" --teacher-attn standard --student performer \
            --student linear --student window --student nsa --steps 1000 --eval-every 100 --out "$out/distill" 2>&1 | tail -30
        find "$out" -type d \( -name checkpoints -o -name students \) -prune -exec rm -rf {} +  # too large to bring back
    ) > "$out/train.log" 2>&1 &
    limit 300 attnbench check --attn rope,alibi,window,exposb --max-seq 16384 2>&1 | tail -60 > "$out/check.txt"
    limit 240 python3 -m pytest -q -m cuda tests 2>&1 | tail -25 > "$out/cuda_tests.txt"
    wait
    cat "$out/check.txt" "$out/cuda_tests.txt" "$out/train.log" | tail -80
    ;;
sweeps)
    speed 250 --attn standard,rope,alibi,exposb --impl triton,sdpa,flex --tokens 16384 --heads 16 --head-dim 128 \
        --seq 1024 2048 4096 8192 16384 --mode fwd --mode fwdbwd --causal --out "$out/variants"
    speed 200 --level layer --attn all --impl all --seq 1024 4096 16384 65536 --mode fwd --out "$out/layers"
    speed 60 --level model --preset small --attn standard --impl triton,sdpa --seq 1024 4096 --mode fwdbwd --out "$out/model"
    ;;
final)  # the CUDA-marked tests alone, then each mechanism's layer sweep in its own run (so one slow
    # mechanism cannot take the others with it); fla and flex (minutes of autotuning/compiles) left out
    limit 150 python3 -m pytest -q -m cuda tests -rf --tb=line 2>&1 | tail -60 | tee "$out/cuda_tests.txt"
    python3 -c "from attnbench.models import registry
for name in registry.mechanisms():
    print(name, ','.join(i for i in registry.get(name).impls if i not in ('fla', 'flex')))" > "$out/layer_impls.txt"
    while read -r name impls; do
        limit 17 attnbench speed --level layer --attn "$name" --impl "$impls" --seq 1024 4096 16384 65536 --mode fwd \
            --out "$out/layers/$name" < /dev/null 2>&1 | tail -12
    done < "$out/layer_impls.txt"
    ;;
esac
