#!/usr/bin/env bash
# One GPU session in one call: build against the machine's torch, run the whole test suite natively,
# run the CUDA op tests under compute-sanitizer (memcheck), then the op and end-to-end benchmarks.
# Everything it measures goes to OUT (default: benchmarks/results), logs included.
#   bash scripts/gpu_session.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
status=0
step() { echo "== $*" | tee -a "$OUT/gpu-session.log"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/gpu-session.log"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu-session.log"

step "build (sm_90)"
pip install -q pillow tqdm cityscapesscripts hypothesis pytest matplotlib >>"$OUT/gpu-session.log" 2>&1
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  pip install --no-build-isolation -e . >>"$OUT/gpu-session.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/gpu-session.log"; exit 1; }

step "tests"
python -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" 2>&1 | tail -30 | tee "$OUT/tests.txt" || status=1

step "compute-sanitizer memcheck on the CUDA op tests"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SANITIZER" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 HYPOTHESIS_PROFILE=ci "$SANITIZER" --tool memcheck --error-exitcode 99 \
    python -m pytest -q -p no:cacheprovider -k "native-cuda" tests/test_pyramid_pool_sum.py tests/test_cascade_feature_fusion.py \
    > "$OUT/memcheck.txt" 2>&1
  echo "memcheck exit code $?" | tee -a "$OUT/memcheck.txt"
else
  echo "compute-sanitizer not found" | tee "$OUT/memcheck.txt"
fi

step "op benchmarks"
python -m benchmarks.run --device cuda --out "$OUT" > "$OUT/ops.txt" 2>>"$OUT/gpu-session.log" || status=1
step "end-to-end benchmarks"
python -m benchmarks.icnet_e2e --device cuda --out "$OUT" > "$OUT/icnet.txt" 2>>"$OUT/gpu-session.log" || status=1
cat "$OUT/ops.txt" "$OUT/icnet.txt"
exit $status
