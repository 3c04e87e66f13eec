#!/usr/bin/env bash
# One GPU session: build against the machine's torch, run the whole test suite natively, run the CUDA op
# tests under compute-sanitizer (memcheck), then the op and end-to-end benchmarks. Everything it measures
# goes to OUT (default: benchmarks/results), logs included.
#   bash scripts/gpu_session.sh OUT
# STAGES picks and orders the steps (default "build tests memcheck ops e2e"), so a session whose calls have
# a time limit can split them; the build is incremental, so repeating it costs seconds. Each step has a
# time limit of its own (seconds, TESTS_S, MEMCHECK_S, OPS_S, E2E_S). RESUME=1 continues an end-to-end
# results file that an earlier call left in benchmarks/results (see benchmarks.icnet_e2e --resume).
# Python packages that the machine lacks and cannot download may travel as wheels in .whl/ (kept out of
# git): the GPU machines lack cityscapesscripts, so fetch it and its pure-Python dependencies first with
#   pip download --no-deps --only-binary=:all: -d .whl cityscapesscripts==2.3.0 coloredlogs==15.0.1 \
#     humanfriendly==10.0 pyquaternion==0.9.9 appdirs==1.4.4
# With 10-minute calls: STAGES="build tests", then STAGES="build memcheck ops", then STAGES="build e2e"
# (copy the e2e results file into benchmarks/results between calls and add RESUME=1 until it is complete).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
STAGES=${STAGES-build tests memcheck ops e2e}
mkdir -p "$OUT"
LOG="$OUT/gpu-session.log"
status=0
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$LOG"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$LOG"
if compgen -G ".whl/*.whl" >/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/icnet-site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/icnet-site${PYTHONPATH:+:$PYTHONPATH}
fi

for stage in $STAGES; do
  case $stage in
  build)
    step "build (sm_90)"
    # --no-deps: the machine may reach no package index; missing packages come from .whl/ above
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
      python -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
      || { echo "build failed"; tail -40 "$LOG"; exit 1; }
    ;;
  tests)
    step "tests"
    timeout "${TESTS_S:-420}" python -m pytest -q -p no:cacheprovider --durations=15 2>&1 | tail -60 > "$OUT/tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    tail -25 "$OUT/tests.txt"
    ;;
  memcheck)
    step "compute-sanitizer memcheck on the CUDA op tests"
    SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -n "$SANITIZER" ]; then
      # Only icnet's own kernels are checked (--kernel-name kns=icnet: their names hold the namespace);
      # cuDNN's and ATen's are not this library's to verify, and leaving them out shortens the run.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 HYPOTHESIS_PROFILE=sanitizer timeout "${MEMCHECK_S:-240}" "$SANITIZER" --tool memcheck \
        --kernel-name kns=icnet --error-exitcode 99 \
        python -m pytest -q -p no:cacheprovider -k "native-cuda" tests/test_pyramid_pool_sum.py \
        tests/test_cascade_feature_fusion.py > "$OUT/memcheck.txt" 2>&1
      code=$?
      echo "memcheck exit code $code" | tee -a "$OUT/memcheck.txt"
      [ "$code" -eq 0 ] || status=1
      grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.txt" | tail -5
    else
      echo "compute-sanitizer not found" | tee "$OUT/memcheck.txt"
      status=1
    fi
    ;;
  ops)
    step "op benchmarks"
    timeout "${OPS_S:-300}" python -m benchmarks.run --device cuda --out "$OUT" > "$OUT/ops.txt" 2>>"$LOG" || status=1
    cat "$OUT/ops.txt"
    ;;
  e2e)
    step "end-to-end benchmarks"
    resume=()
    if [ "${RESUME:-0}" = 1 ]; then
      cp benchmarks/results/icnet-nvidia-*.json "$OUT/" 2>/dev/null
      resume=(--resume)
    fi
    timeout "${E2E_S:-540}" python -m benchmarks.icnet_e2e --device cuda --out "$OUT" "${resume[@]}" \
      > "$OUT/icnet.txt" 2>>"$LOG" || status=1
    cat "$OUT/icnet.txt"
    ;;
  *)
    echo "unknown stage $stage"; exit 2 ;;
  esac
done
step "done, status $status"
exit $status
