#!/usr/bin/env bash
# The device checks in one script, for a machine with a GPU, JAX and PyTorch
# but no TensorFlow (under 8 minutes there):
#   1. the zoo's ResNet-18 throughput under Keras on JAX against PyTorch
#      (benchmarks/throughput.py --compare-torch; goal ratio >= 0.9);
#   2. the EMA update's share of a step at period 16 (benchmarks/ema_overhead.py;
#      goal <= 0.5%);
#   3. the epoch-overhead table of train.py for ResNet-18 on CIFAR-100-shaped
#      synthetic data, the paper's decays at period 16 (benchmarks/epoch_overhead.py);
#   4. ArrayLoader's images/s (benchmarks/loader.py) against the GPU's from 1.
#
# On the device machine, from the project root, with the Keras wheels that
# ../shared/tools/device-wheels.sh prepared in .whl/ (carried along):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax && bash benchmarks/gpu.sh
#
# `--quick`: tiny models, few steps and images, for a CPU (checks that every
# step runs; the figures mean nothing). Without PyTorch, step 1 times Keras
# alone. PYTHON names the interpreter (default python3). Each step prints its
# own table; a step that fails is reported and the others still run; the exit
# status is that of the last failure.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "gpu.sh: unknown argument $1; use --quick or nothing." >&2; exit 2 ;;
esac
DECAYS=0.968,0.984,0.992,0.996,0.998
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT
status=0
step() {  # step NAME COMMAND...: runs COMMAND, output to the terminal and LOG/NAME
  local name=$1; shift
  echo; echo "=== $name: $* ==="
  local start=$SECONDS
  "$@" 2>&1 | tee "$LOG/$name"
  local rc=${PIPESTATUS[0]}
  echo "--- $name: exit $rc, $((SECONDS - start)) s"
  if [ "$rc" != 0 ]; then status=$rc; fi
}

if [ $QUICK = 1 ]; then
  THROUGHPUT=(--width 0.0625 --batch_size 16 --steps 2 --warmup_steps 1)
  EMA=(--width 0.0625 --image_size 8 --batch_size 8 --steps 4 --rounds 1 --update_reps 2)
  EPOCH=(--width=0.0625 --batch_size=16 --steps=2 --synthetic_images=64 --measure_epochs=2)
  LOADER=(--quick)
else
  THROUGHPUT=(--steps 100)
  EMA=(--image_size 32 --batch_size 128 --steps 32 --rounds 2)
  EPOCH=(--width=1 --batch_size=128 --measure_epochs=3)
  LOADER=(--workers 4)
fi

if "$PY" -c "import torch" 2>/dev/null; then
  step throughput "$PY" benchmarks/throughput.py --compare-torch "${THROUGHPUT[@]}"
  GPU_RATE=$(awk '$1 ~ /^keras\// {print $3; exit}' "$LOG/throughput")
else
  echo; echo "PyTorch is not installed: step 1 times Keras alone."
  step throughput "$PY" benchmarks/throughput.py --models resnet18 "${THROUGHPUT[@]}"
  GPU_RATE=$(awk '$1 == "resnet18" {print $4}' "$LOG/throughput" | sort -g | tail -1)
fi
step ema_update "$PY" benchmarks/ema_overhead.py "${EMA[@]}"
step epoch_overhead "$PY" benchmarks/epoch_overhead.py --synthetic=cifar100 \
  --model=resnet18 --ema_decays=$DECAYS --ema_period=16 "${EPOCH[@]}"
step loader "$PY" benchmarks/loader.py "${LOADER[@]}"

LOADER_RATE=$(awk '$1 == "ArrayLoader" && NF == 3 {print $2}' "$LOG/loader")
echo
echo "=== loader against the GPU ==="
if [ -n "${GPU_RATE:-}" ] && [ -n "${LOADER_RATE:-}" ]; then
  awk -v l="$LOADER_RATE" -v g="$GPU_RATE" 'BEGIN {
    printf "ArrayLoader %.0f images/s (one thread) vs training %.0f images/s: %.2fx%s\n",
      l, g, l / g, (l >= g ? "" : " -- the loader would cap training") }'
else
  echo "missing a figure (loader: ${LOADER_RATE:-none}, training: ${GPU_RATE:-none})"
  status=1
fi
exit $status
