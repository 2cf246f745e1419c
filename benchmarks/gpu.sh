#!/usr/bin/env bash
# The GPU check anyone can run (issue #22), from the repository root, source tree only:
#
#   benchmarks/gpu.sh [OUT_DIR] [cuda|cpu]        # default: gpu-check cuda
#   QUICK=1 benchmarks/gpu.sh /tmp/dry cpu         # a dry run of every step on a CPU (minutes)
#
# Steps, each with its own time limit, every output in OUT_DIR (one file a step, rc at its end):
# the device; the meta-gradient checks (float64 paths equal, float32 on the device against the
# CPU's float32, TF32/bf16 beside); the speed table for fp32, tf32 and bf16 (second order,
# first order, evaluation; Conv4-64 28x28 mb 32 and Conv4-32 84x84 mb 4); the default
# `sparsemeta train` and `sparsemeta run`. Sized for < 8 minutes on one H200 (the default
# train took 40 s there and the run ~65 s on 2026-12-04); `higher` is used when installed.
set -u
OUT=${1:-gpu-check}
DEVICE=${2:-cuda}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
export PYTHONPATH="src:edge/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ -n "${QUICK:-}" ]; then  # a dry run: every step, tiny sizes, on a CPU (4x the limits: the
    # float64 checks before timing alone take ~1 min of a 2-core CPU per precision)
    CASES=c64-28-mb4; REPEATS=1; UPDATES="--updates 1 --eval-tasks 16"; SCALE=4
    TRAIN=(--set train.iterations=6 --set train.val_every=3 --set train.val_tasks=4
           --set eval.tasks=8 --set model.filters=8)
    RUN=("${TRAIN[@]}" --set prune.levels=1)
else
    CASES=c64-28-mb32,c32-84-mb4; REPEATS=1; UPDATES=""; SCALE=1
    TRAIN=(); RUN=()
fi

step() {  # step NAME SECONDS COMMAND…: run it under its own limit; its output and rc in OUT
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "rc $rc" >> "$OUT/$name.txt"
    tail -n 4 "$OUT/$name.txt"
}

step device 60 "$PY" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step checks 120 "$PY" benchmarks/meta_speed.py --device "$DEVICE" --quick
step checks_maml_shapes 240 "$PY" benchmarks/meta_speed.py --device "$DEVICE" --check-shapes \
    --cases "$CASES"
for precision in fp32 tf32 bf16; do
    # shellcheck disable=SC2086  # UPDATES holds flags
    step "speed_$precision" 150 "$PY" benchmarks/meta_speed.py --device "$DEVICE" \
        --precision "$precision" --cases "$CASES" --impls core,loop,higher,grouped \
        --orders second,first,eval --repeats "$REPEATS" $UPDATES --timeout 60
done
step train 120 "$PY" -m sparsemeta train --set device="$DEVICE" "${TRAIN[@]}" --out "$OUT/train"
step run 240 "$PY" -m sparsemeta run --set device="$DEVICE" "${RUN[@]}" --out "$OUT/run"
echo "outputs in $OUT"
