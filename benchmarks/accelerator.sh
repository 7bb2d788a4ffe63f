#!/usr/bin/env bash
# The benchmark harness on a GPU or TPU, in one JSON: the train step at batch 128 in bfloat16
# (img/s, FLOPs, MFU against a measured matmul peak and the chip's specified one), the forward
# pass and DDIM-50 and DPM-Solver-20 at batch 256 (img/s), compile times (train step; each
# sampler at its steps and at 10x), peak device and host memory. No dataset, no network.
#
#   bash benchmarks/accelerator.sh          # from the repository root; about 3-6 minutes
#
# Every setting is an environment variable (defaults in brackets):
#   JAXDIFF_BENCH_CONFIG [configs/cifar10.py]   JAXDIFF_BENCH_DTYPE [bfloat16]
#   JAXDIFF_BENCH_BATCH [128] (train)           JAXDIFF_BENCH_SAMPLES [256] (forward, samplers)
#   JAXDIFF_BENCH_SAMPLERS [ddim:50,dpm_solver:20]
#   JAXDIFF_BENCH_MATMUL [8192] (the peak's matmul size)   JAXDIFF_BENCH_REPEATS [5]
#   JAXDIFF_BENCH_OVERRIDES [] ("model.ch=8 train.grad_accum_steps=2": FIELD=VALUE, spaces between)
#   JAXDIFF_BENCH_PEER [auto]: 1 adds the PyTorch peer (diffusers), 0 leaves it out, auto adds it
#     where torch and diffusers import and torch sees a CUDA device (never with overrides)
#   JAXDIFF_BENCH_OUTPUT [benchmarks/results/accelerator-HOST-DATE.json]   PYTHON [python]
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python}
output=${JAXDIFF_BENCH_OUTPUT:-benchmarks/results/accelerator-$(hostname)-$(date +%Y%m%d-%H%M%S).json}
overrides=()
for override in ${JAXDIFF_BENCH_OVERRIDES:-}; do
  overrides+=("--override=$override")
done

peer=${JAXDIFF_BENCH_PEER:-auto}
if [[ $peer == auto ]]; then
  peer=0
  if [[ ${#overrides[@]} -eq 0 ]] && "$python" -c \
      "import sys, torch, diffusers; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    peer=1
  fi
fi
peer_flag=()
[[ $peer == 1 ]] && peer_flag=(--peer)

"$python" -m benchmarks.benchmark \
  --config="${JAXDIFF_BENCH_CONFIG:-configs/cifar10.py}" \
  --dtype="${JAXDIFF_BENCH_DTYPE:-bfloat16}" \
  --batch_size="${JAXDIFF_BENCH_BATCH:-128}" \
  --num_samples="${JAXDIFF_BENCH_SAMPLES:-256}" \
  --samplers="${JAXDIFF_BENCH_SAMPLERS:-ddim:50,dpm_solver:20}" \
  --matmul_size="${JAXDIFF_BENCH_MATMUL:-8192}" \
  --repeats="${JAXDIFF_BENCH_REPEATS:-5}" \
  --output="$output" "${overrides[@]}" "${peer_flag[@]}"
echo "accelerator benchmark JSON: $(cd "$(dirname "$output")" && pwd)/$(basename "$output")"
