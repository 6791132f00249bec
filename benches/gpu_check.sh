#!/usr/bin/env bash
# One-shot GPU check (the device machine: torch 2.11 + triton 3.6, no registry): builds the
# extension with CUDA (in the background, while the kernel tests compile and run), runs the GPU
# tests, the whole-step comparison against the peers, a kernel-time profile of the captured step,
# a tile sweep of the GEMM kernels (writing $OUT/tiles.json, then timing our step with it) and
# prints a short table last. Logs go to $OUT (default ./gpu_out), at most 8 files (the device
# tool brings back no more): build.log, tests_kernels.log, tests_step.log, steps.md, profile.md,
# tune.md, tiles.json, optim.log. The step table runs three times: the default (dy through the
# backward GEMMs' prologues, G on a side stream beside D(real)), FASTDCGAN_MATERIALIZE_DY=1, and
# FASTDCGAN_OVERLAP_G=0 (batch 128).
# Usage: bash benches/gpu_check.sh   (SKIP_TUNE=1 skips the tile sweep)
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }
# failing tests with their assertion lines (which quantity, which values)
failures() { grep -E "^(FAILED|ERROR)|^E   |crashed" "$1" | head -${2:-40}; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/build.log"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/build.log"

step "build (background)"
# In place, not `pip install -e` (its setuptools re-invokes pip with build isolation, which needs
# a registry): the checkout is put on PYTHONPATH with kernels/ linked in as fastdcgan.kernels.
[ -e fastdcgan/kernels ] || ln -s ../kernels fastdcgan/kernels
export PYTHONPATH=$PWD:$PWD/benches${PYTHONPATH:+:$PYTHONPATH}
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=8 \
  $py setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 &
build_pid=$!

step "kernel tests (parallel workers share the Triton cache)"
timeout ${TEST_TIMEOUT:-240} $py -m pytest -q -p no:cacheprovider -n ${WORKERS:-8} --tb=short \
  tests/test_conv_transpose_bn_act.py tests/test_conv_bn_act.py tests/test_models_triton.py \
  >"$OUT/tests_kernels.log" 2>&1
tail -2 "$OUT/tests_kernels.log"; failures "$OUT/tests_kernels.log"

step "extension; training step tests while the tile sweep's kernels compile (background)"
wait $build_pid || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; }
$py -c "import fastdcgan._ext as e; e.load(); print('extension with CUDA:', e.with_cuda())"
tune_pids=()
compile_logs=$(mktemp -d)
if [ -z "${SKIP_TUNE:-}" ]; then
  for layer in ${TUNE_LAYERS:-G1 G2 G3 D1 D2 D3}; do for dt in bf16 fp32; do
    timeout 240 $py benches/tune_gemm.py --compile-only --layers $layer --dtypes $dt \
      >"$compile_logs/${layer}_$dt.log" 2>&1 & tune_pids+=($!)
  done; done
fi
timeout ${STEP_TEST_TIMEOUT:-200} $py -m pytest -q -p no:cacheprovider -n 4 --tb=short \
  tests/test_optim.py tests/test_loss.py tests/test_step.py tests/test_sampler.py tests/test_weights.py \
  tests/test_generate.py >"$OUT/tests_step.log" 2>&1
tail -2 "$OUT/tests_step.log"; failures "$OUT/tests_step.log"

step "adam_step argument checks (segfaulted here before): C stack of a crash"
if command -v gdb >/dev/null; then
  timeout 60 gdb -q -batch -ex run -ex bt --args $py -X faulthandler -m pytest -q -p no:cacheprovider \
    -p no:xdist tests/test_optim.py -k op_checks_arguments 2>&1 | grep -vE "^\[(New|Thread)" | tail -25
else
  timeout 60 $py -X faulthandler -m pytest -q -p no:cacheprovider -p no:xdist tests/test_optim.py \
    -k op_checks_arguments 2>&1 | tail -25
fi

step "train step vs peers"
timeout ${TABLE_TIMEOUT:-150} $py benches/step_table.py --batches 128,512 --steps 20 \
  2>&1 | tee "$OUT/steps.md" | tail -16

echo "dy materialized once per block (FASTDCGAN_MATERIALIZE_DY=1):" | tee -a "$OUT/steps.md"
FASTDCGAN_MATERIALIZE_DY=1 timeout 90 $py benches/step_table.py --batches 128,512 --steps 20 \
  --peers none 2>&1 | tee -a "$OUT/steps.md" | tail -6
echo "G not overlapped with D(real) (FASTDCGAN_OVERLAP_G=0):" | tee -a "$OUT/steps.md"
FASTDCGAN_OVERLAP_G=0 timeout 60 $py benches/step_table.py --batches 128 --steps 20 \
  --peers none 2>&1 | tee -a "$OUT/steps.md" | tail -4

step "profile of the captured step"
for prec in bf16 fp32; do
  timeout 60 $py benches/profile_step.py --batch 128 --precision $prec --top 14 2>&1 | tee -a "$OUT/profile.md" | tail -17
done

if [ -z "${SKIP_TUNE:-}" ]; then
  step "GEMM tile sweep (timed), then our step with the tuned tiles"
  for pid in "${tune_pids[@]}"; do wait $pid; done
  grep -l -iE "error|Traceback" "$compile_logs"/*.log | head -3
  timeout ${TUNE_TIMEOUT:-200} $py benches/tune_gemm.py --write "$OUT/tiles.json" 2>&1 | tee "$OUT/tune.md" | tail -70
  echo "with the tuned tiles:" >>"$OUT/steps.md"
  FASTDCGAN_TILES=$OUT/tiles.json timeout 90 $py benches/step_table.py --batches 128,512 --steps 20 \
    --peers none 2>&1 | tee -a "$OUT/steps.md" | tail -6
fi

step "Generator inference B=512 (ours, captured, peers; torch.compile: see peers.md)"
timeout 90 $py -m pytest -q -p no:cacheprovider benches/bench_generator.py --benchmark-only \
  -k "not compile" --benchmark-columns=median,min --benchmark-sort=name 2>&1 | grep -E "test_generator|passed|failed|Error" | tail -14

step "optimizer"
timeout 45 $py -m pytest -q -p no:cacheprovider benches/bench_optim.py --benchmark-only -k cuda \
  --benchmark-columns=median,min --benchmark-sort=name 2>&1 | tee "$OUT/optim.log" | tail -8

step summary
grep -hE "passed|failed|error" "$OUT"/tests_*.log | tail -4
cat "$OUT/steps.md"
