#!/usr/bin/env bash
# The GPU train-step runs docs/benchmarks.md reports, in priority order, each under its own
# time limit so that one failure or slow compile leaves the others' results:
#
#     bash benchmarks/gpu_throughput.sh OUTDIR [SECONDS_PER_RUN]
#
# bf16 CIFAR-10 and CelebA 64 at the paper's batch 128 first, as training runs them (calls
# pipelined: the loop does not wait after each), then what explains them: each call waited on
# (the per-call wait), four steps per call, batch 256 (a fuller chip) and float32.
# Each run writes OUTDIR/NAME.json and OUTDIR/NAME.log. FLOPs are counted on the program
# lowered for the host's CPU (the GPU's cost analysis leaves out cuDNN's convolutions).
set -u
out=${1:?usage: gpu_throughput.sh OUTDIR [SECONDS_PER_RUN]}
limit=${2:-150}
mkdir -p "$out"
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version \
  --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$out/gpu.txt"

run() {  # NAME ARGS...: one train_throughput run
  local name=$1; shift
  echo "=== $name: $*"
  timeout "$limit" python3 benchmarks/train_throughput.py --matmul_size=8192 --repeats=10 \
    --output="$out/$name.json" "$@" >"$out/$name.log" 2>&1
  echo "exit $?"; grep -A2 "^backend" "$out/$name.log"
}
bf16="--config.model.dtype=bfloat16"
run cifar10_bf16_b128 --config=configs/cifar10.py --batch=128 $bf16 --pipelined_calls=8
run celeba64_bf16_b128 --config=configs/celeba64.py --batch=128 $bf16 --pipelined_calls=8
run cifar10_bf16_b128_wait --config=configs/cifar10.py --batch=128 $bf16
run cifar10_bf16_b128_k4 --config=configs/cifar10.py --batch=128 $bf16 \
  --config.steps_per_dispatch=4 --pipelined_calls=2
run celeba64_bf16_b128_k4 --config=configs/celeba64.py --batch=128 $bf16 \
  --config.steps_per_dispatch=4 --pipelined_calls=2
run cifar10_bf16_b256 --config=configs/cifar10.py --batch=256 $bf16 --pipelined_calls=8
run cifar10_f32_b128 --config=configs/cifar10.py --batch=128 --pipelined_calls=8
