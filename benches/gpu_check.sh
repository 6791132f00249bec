#!/usr/bin/env bash
# One-shot GPU check (the device machine: torch 2.11 + triton 3.6, no registry, 16 cores): builds
# the extension with CUDA, runs the GPU tests, the whole-step comparison against the peers and the
# measurements below, and prints a short table last, inside BUDGET seconds (default 540: one
# device call may run 600). Every step after the tests runs only if the time it needs is left, in
# priority order, so the summary always prints:
#   1. GPU tests: kernels (tests_kernels.log, in the background from the start); adam_step's
#      argument checks alone once the extension is built (optim.log; they crashed on this
#      machine before: on a crash, the C stack under (cuda-)gdb); training step, sampler,
#      optimizer (tests_step.log)
#   2. step table vs peers at B=128 and 512 (steps.md): D on real and fake in one grouped pass;
#      then each fused layer vs the eager sequence it replaces (benches/layer_table.py); then our
#      step with the weight gradients on a second stream (FASTDCGAN_WGRAD_STREAM=1), and with the
#      GEMMs' raw operands loaded as TMA boxes (FASTDCGAN_TMA=1), and with both: off by default
#      until this times them
#   3. Generator inference B=512 and the optimizer against their peers (optim.log)
#   4. kernel-time profile of the captured step, bf16 and fp32 at B=128, and of Generator
#      inference at B=512 bf16 (profile.md)
#   5. the step at B=128 with FASTDCGAN_JOINT_D=0 (two D passes, G beside D(real)), with
#      FASTDCGAN_TAP_PAIRS=1 (column-tap pairs share their A tile loads: off by default), at B=128
#      and 512 with FASTDCGAN_PDL=1 (programmatic dependent launch, kernels/pdl.py), and with the
#      operands transformed in the consuming GEMMs' prologues, or only dy or only the
#      activations written once per block (the default writes both)
#   6. Nsight Compute's speed of light of two forward GEMMs (benches/gemm_sol.py) (profile.md)
#   7. with TUNE=1 (kernels/tiles.json holds the H100's bf16 tiles of session 10): GEMM tile
#      sweep of bf16, or of TUNE_DTYPES (e.g. fp32, whose raw-feed tiles are the heuristics'),
#      (tune.md; $OUT/tiles.json keeps the table's other entries; D's layers also at the grouped
#      pass's doubled batch) for the feed that step 5 found faster (TUNE_FEED=prologues|raw|tma
#      overrides; tma: the boxed GEMMs' own tiles, for FASTDCGAN_TMA=1), then the step table
#      with it
# The Triton cache starts empty on a fresh machine: the step tables' and the sweep's kernels
# compile in the background while the tests run (they share the on-disk cache), and are stopped
# before the timed runs if not done by then (WARM_UNTIL s left). Logs go to $OUT (default
# ./gpu_out), at most 8 files (the device tool brings back no more): build.log, tests_kernels.log,
# tests_step.log, steps.md, profile.md, tune.md, tiles.json, optim.log.
# Usage: bash benches/gpu_check.sh   (BUDGET=seconds; TUNE=1 adds the tile sweep, SKIP_TESTS=1 skips
# the tests: e.g. a second call on the still-warm machine, whose Triton cache is filled)
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
left() { echo $(( deadline - $(date +%s) )); }
step() { echo; echo "=== $* ($(date +%T), $(left) s left)"; }
# run NEED LIMIT CMD...: CMD under a timeout of LIMIT s (cut to what is left), if NEED s are left
run() {
  local need=$1 limit=$2; shift 2
  local l; l=$(left)
  if (( l < need )); then echo "SKIPPED (needs ${need} s, ${l} left): $*"; return 1; fi
  timeout $(( limit < l ? limit : l )) "$@"
}
# a test log's last lines, then its failing tests with their assertion lines (which quantity,
# which values)
# (the tests run with -v: a test's name and outcome are logged as it ends, so a run cut short by
# its timeout still names its failures)
report() { [ -f "$1" ] || return 0; tail -2 "$1"; grep -E "(FAILED|ERROR) tests/|^E   |crashed" "$1" | head -40; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/build.log"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/build.log"

step "build and kernel compiles (background)"
# In place, not `pip install -e` (its setuptools re-invokes pip with build isolation, which needs
# a registry): the checkout is put on PYTHONPATH with kernels/ linked in as fastdcgan.kernels.
[ -e fastdcgan/kernels ] || ln -s ../kernels fastdcgan/kernels
export PYTHONPATH=$PWD:$PWD/benches${PYTHONPATH:+:$PYTHONPATH}
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=8 \
  $py setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 &
build_pid=$!
warm_logs=$(mktemp -d)
warm() {   # one short run of each timed configuration (step tables, layer table): compiles their kernels
  while kill -0 $build_pid 2>/dev/null; do sleep 1; done   # (the build is not this subshell's child)
  # "BATCHES ENV [ARGS]": the batch sizes, an environment assignment, more step_table arguments
  for cfg in "128 _=" "512 _=" "128 FASTDCGAN_JOINT_D=0" "128 FASTDCGAN_TAP_PAIRS=1" \
      "128,512 FASTDCGAN_PDL=1" "128,512 _= --feeds prologues,dy,act" "128,512 FASTDCGAN_TMA=1"; do
    set -- $cfg
    local batches=$1 assign=$2; shift 2
    env $assign timeout 300 $py benches/step_table.py --batches $batches --steps 1 --peers none "$@" \
      >"$warm_logs/${batches}_${assign}_$#.log" 2>&1 &
    echo $! >>"$warm_logs/pids"
  done
  timeout 300 $py benches/layer_table.py --no-compile >"$warm_logs/layers.log" 2>&1 &
  echo $! >>"$warm_logs/pids"
  if [ -n "${TUNE:-}" ]; then
    for layer in G1 G2 G3 D1 D2 D3; do
      timeout 300 $py benches/tune_gemm.py --compile-only --layers $layer --dtypes ${TUNE_DTYPES:-bf16} \
        --feed ${TUNE_FEED:-raw} \
        >"$warm_logs/tune_$layer.log" 2>&1 &
      echo $! >>"$warm_logs/pids"
    done
  fi
  wait
}
warm &
warm_pid=$!

step "kernel tests, in the background (parallel workers share the Triton cache)"
[ -n "${SKIP_TESTS:-}" ] && with_tests=0 || with_tests=1
kernel_tests=
if (( with_tests )); then
  # beside the build and then the step tests: the kernel tests need no extension
  run 60 240 $py -m pytest -v -p no:cacheprovider -n ${WORKERS:-6} --tb=short \
    tests/test_conv_transpose_bn_act.py tests/test_conv_bn_act.py tests/test_models_triton.py \
    tests/test_batch_groups.py tests/test_tma.py >"$OUT/tests_kernels.log" 2>&1 &
  kernel_tests=$!
fi

step "extension, then training step / sampler / optimizer tests"
wait $build_pid || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; }
$py -c "import fastdcgan._ext as e; e.load(); print('extension with CUDA:', e.with_cuda())"
# adam_step's argument checks first, alone: they crashed a worker here before (a compiler's own
# stream code in the extension); on a crash, the C stack
run 20 40 $py -X faulthandler -m pytest -q -p no:cacheprovider -p no:xdist tests/test_optim.py \
  -k op_checks_arguments 2>&1 | tail -3 | tee "$OUT/optim.log"
if ! grep -q " passed" "$OUT/optim.log"; then
  debugger=$(command -v gdb || command -v cuda-gdb)   # the device machines have cuda-gdb only
  [ -n "$debugger" ] && run 20 40 $debugger -q -batch -ex run -ex "bt 14" --args $py -m pytest -q \
    -p no:cacheprovider -p no:xdist tests/test_optim.py -k op_checks_arguments 2>&1 \
    | grep -E "^#|SIG|passed|failed" | head -20
fi
(( with_tests )) && run 60 180 $py -m pytest -v -p no:cacheprovider -n 4 --tb=short --durations=12 \
  tests/test_optim.py tests/test_loss.py tests/test_step.py tests/test_sampler.py tests/test_weights.py \
  tests/test_generate.py >"$OUT/tests_step.log" 2>&1
report "$OUT/tests_step.log"

step "kernel tests: their end"
[ -n "$kernel_tests" ] && wait $kernel_tests
report "$OUT/tests_kernels.log"

step "background compiles: done, or stopped (their GPU work would disturb the timings)"
while kill -0 $warm_pid 2>/dev/null && (( $(left) > ${WARM_UNTIL:-330} )); do sleep 2; done
[ -f "$warm_logs/pids" ] && kill $(cat "$warm_logs/pids") 2>/dev/null
grep -l -E "Traceback" "$warm_logs"/*.log 2>/dev/null | head -3 | while read -r f; do
  echo "warm-up error in $(basename "$f"):"; grep -E "Error" "$f" | tail -2; done

step "train step vs peers"
run 60 120 $py benches/step_table.py --batches 128,512 --steps 20 2>&1 | tee "$OUT/steps.md" | tail -16

step "per layer: each fused op vs the eager sequence it replaces (issues 3 and 4)"
echo "per layer (benches/layer_table.py --no-compile):" >>"$OUT/steps.md"
run 60 90 $py benches/layer_table.py --no-compile 2>&1 | tee -a "$OUT/steps.md" | tail -8

step "candidate defaults: weight gradients on a second stream, GEMM operands as TMA boxes, both"
for assign in FASTDCGAN_WGRAD_STREAM=1 FASTDCGAN_TMA=1 "FASTDCGAN_WGRAD_STREAM=1 FASTDCGAN_TMA=1"; do
  echo "$assign:" >>"$OUT/steps.md"
  run 40 80 env $assign $py benches/step_table.py --batches 128,512 --steps 20 --peers none 2>&1 \
    | tee -a "$OUT/steps.md" | tail -6
done

step "Generator inference B=512 (ours, captured, peers; torch.compile: see peers.md)"
run 30 60 $py -m pytest -q -p no:cacheprovider benches/bench_generator.py --benchmark-only \
  -k "not compile" --benchmark-columns=median,min --benchmark-sort=name 2>&1 \
  | grep -E "test_generator|passed|failed|Error" | tail -14

step "optimizer"
run 20 40 $py -m pytest -q -p no:cacheprovider benches/bench_optim.py --benchmark-only -k cuda \
  --benchmark-columns=median,min --benchmark-sort=name 2>&1 | tee -a "$OUT/optim.log" | tail -8

step "profile of the captured step"
for prec in bf16 fp32; do   # the per-launch sequence goes to profile.md only
  run 25 50 $py benches/profile_step.py --batch 128 --precision $prec --top 14 --sequence \
    >>"$OUT/profile.md" 2>&1
  grep -A16 "^### B=128 $prec" "$OUT/profile.md" || tail -5 "$OUT/profile.md"
done

step "profile of Generator inference B=512 bf16 (its target: 0.4 ms)"
run 25 50 $py benches/profile_step.py --generator --batch 512 --precision bf16 --top 10 --sequence \
  >>"$OUT/profile.md" 2>&1
grep -A12 "^### B=512 bf16" "$OUT/profile.md" || tail -5 "$OUT/profile.md"
echo "with FASTDCGAN_TMA=1:" | tee -a "$OUT/profile.md"
FASTDCGAN_TMA=1 run 25 50 $py benches/profile_step.py --generator --batch 512 --precision bf16 \
  --top 6 2>&1 | tee -a "$OUT/profile.md" | grep -A8 "^### B=512 bf16"

step "D on real and fake in two passes, G beside D(real) (FASTDCGAN_JOINT_D=0)"
echo "D in two passes, G beside D(real) (FASTDCGAN_JOINT_D=0):" >>"$OUT/steps.md"
FASTDCGAN_JOINT_D=0 run 30 60 $py benches/step_table.py --batches 128 --steps 20 --peers none \
  2>&1 | tee -a "$OUT/steps.md" | tail -4

step "column-tap pairs sharing their A tile loads (FASTDCGAN_TAP_PAIRS=1)"
echo "column-tap pairs (FASTDCGAN_TAP_PAIRS=1):" >>"$OUT/steps.md"
FASTDCGAN_TAP_PAIRS=1 run 30 60 $py benches/step_table.py --batches 128 --steps 20 --peers none \
  2>&1 | tee -a "$OUT/steps.md" | tail -4

step "programmatic dependent launch (FASTDCGAN_PDL=1)"
echo "programmatic dependent launch (FASTDCGAN_PDL=1):" >>"$OUT/steps.md"
FASTDCGAN_PDL=1 run 30 60 $py benches/step_table.py --batches 128,512 --steps 20 --peers none \
  2>&1 | tee -a "$OUT/steps.md" | tail -6

step "the other ways of feeding the GEMMs: prologues, or only dy / only the activations written"
echo "through the prologues / dy only / activations only (FASTDCGAN_MATERIALIZE_ACT / _DY):" \
  >>"$OUT/steps.md"
run 50 90 $py benches/step_table.py --batches 128,512 --steps 20 --peers none \
  --feeds prologues,dy,act 2>&1 | tee -a "$OUT/steps.md" | tail -14

step "Nsight Compute: what bounds two bf16 forward GEMMs (G3 at B=512, D2 at B=128)"
if command -v ncu >/dev/null; then
  for case in "G3 512" "D2 128"; do
    set -- $case
    run 40 60 ncu --clock-control none -k regex:conv_gemm_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      $py benches/gemm_sol.py --layer $1 --batch $2 2>&1 | grep -v "^==PROF==" | tee -a "$OUT/profile.md" \
      | grep -E "gemm_sol|Duration|Throughput|Hit Rate|Occupancy|Registers Per|Block Limit|Error" | head -24
  done
else
  echo "no ncu on this machine"
fi

# "prologues" when steps.md has the bf16 B=128 step through the prologues faster than the
# default (every operand materialized), else "raw"
faster_feed() {
  awk -F'|' '/fastdcgan bf16 \(CUDA graph\) B=128/ {d = $3 + 0}
    /fastdcgan bf16 \(CUDA graph, through the prologues\) B=128/ {p = $3 + 0}
    END {print (p > 0 && d > 0 && p < d) ? "prologues" : "raw"}' "$1"
}

if [ -n "${TUNE:-}" ]; then
  feed=${TUNE_FEED:-$(faster_feed "$OUT/steps.md")}   # sweep the tiles of the faster feed
  step "GEMM tile sweep (${TUNE_DTYPES:-bf16}, timed, $feed operands), then our step with the tuned tiles"
  if run 100 $(( $(left) - 60 )) $py benches/tune_gemm.py --dtypes ${TUNE_DTYPES:-bf16} --feed $feed \
      --write "$OUT/tiles.json" >"$OUT/tune.md" 2>&1; then
    tail -60 "$OUT/tune.md"
    echo "with the tuned tiles ($feed operands):" >>"$OUT/steps.md"
    FASTDCGAN_TILES=$OUT/tiles.json FASTDCGAN_TMA=$([ "$feed" = tma ] && echo 1 || echo 0) \
      run 40 60 $py benches/step_table.py --batches 128,512 --steps 20 --peers none \
      --feeds $([ "$feed" = prologues ] && echo prologues || echo both) 2>&1 \
      | tee -a "$OUT/steps.md" | tail -6
  else
    tail -30 "$OUT/tune.md" 2>/dev/null
  fi
fi

step summary
grep -hE "passed|failed|error" "$OUT"/tests_*.log 2>/dev/null | tail -4
cat "$OUT/steps.md"
