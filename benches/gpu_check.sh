#!/usr/bin/env bash
# One-shot GPU check (the device machine: torch 2.11 + triton 3.6, no registry): builds the
# extension with CUDA (in the background, while the kernel tests compile and run), runs the GPU
# tests, the benchmarks against eager PyTorch, and prints a short table last. Logs go to $OUT
# (default ./gpu_out). Usage: bash benches/gpu_check.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"

step "build (background)"
# In place, not `pip install -e` (its setuptools re-invokes pip with build isolation, which needs
# a registry): the checkout is put on PYTHONPATH with kernels/ linked in as fastdcgan.kernels.
[ -e fastdcgan/kernels ] || ln -s ../kernels fastdcgan/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=8 \
  $py setup.py build_ext --inplace >"$OUT/build.log" 2>&1 &
build_pid=$!

step "kernel tests (parallel workers share the Triton cache)"
timeout ${TEST_TIMEOUT:-220} $py -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} \
  tests/test_conv_transpose_bn_act.py tests/test_conv_bn_act.py tests/test_models_triton.py \
  2>&1 | tee "$OUT/tests_kernels.log" | tail -25

step "extension"
wait $build_pid || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; }
grep -iE "building|cuda" "$OUT/build.log" | head -3
$py -c "import fastdcgan._ext as e; e.load(); print('extension with CUDA:', e.with_cuda())"
timeout 60 $py -m pytest -q -p no:cacheprovider tests/test_optim.py tests/test_loss.py 2>&1 \
  | tee "$OUT/tests_ext.log" | tail -8

step "train step"
timeout ${STEP_TIMEOUT:-100} $py benches/step_table.py --batches 128,512 --steps 15 2>&1 \
  | tee "$OUT/steps.md" | tail -8

step layers
timeout ${LAYER_TIMEOUT:-120} $py benches/layer_table.py --no-compile 2>&1 | tee "$OUT/layers.md" | tail -45

step "optimizer"
timeout 45 $py -m pytest -q -p no:cacheprovider benches/bench_optim.py --benchmark-only -k cuda \
  --benchmark-columns=median,min --benchmark-sort=name 2>&1 | tee "$OUT/optim.log" | tail -14

step summary
grep -hE "passed|failed|error" "$OUT"/tests_*.log | tail -4
cat "$OUT/steps.md"
