#!/usr/bin/env bash
# Validates ddpm-fast on a GPU machine, start to finish, in well under 10 minutes on one H100:
#   build the extension against this machine's torch, run every test (CUDA-marked ones included),
#   run compute-sanitizer memcheck and racecheck over one small call of every CUDA kernel, run the
#   benchmarks, and print a summary table last.  Results and logs go to the directory given (default
#   benchmarks/results/).  Optional: WHEELS=dir of wheels for test dependencies (pytest,
#   diffusers, ...) when the machine has no network.
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
declare -a SUMMARY

step() {  # step NAME LOG COMMAND...
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  "$@" >"$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  SUMMARY+=("$(printf '%-22s %-6s %4ss  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$log")")
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  $PY -c 'import triton; print("triton", triton.__version__)' || echo "triton not installed"
} | tee "$OUT/gpu_env.txt"

if [ -n "${WHEELS:-}" ]; then
  step "test deps" "$OUT/deps.log" $PY -m pip install --no-index --find-links "$WHEELS" \
    pytest pytest-benchmark diffusers safetensors matplotlib
fi
step "build" "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps -v -e . || true
step "tests" "$OUT/tests.log" $PY -m pytest tests -q -rs --junitxml="$OUT/tests.xml"
if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  step "memcheck" "$OUT/memcheck.log" "$SAN" --tool memcheck --error-exitcode 1 $PY benchmarks/cuda_smoke.py
  # Shared-memory hazards (the attention and GroupNorm kernels stage tiles and partial sums there).
  step "racecheck" "$OUT/racecheck.log" "$SAN" --tool racecheck --error-exitcode 1 $PY benchmarks/cuda_smoke.py
else
  SUMMARY+=("$(printf '%-22s %-6s' memcheck MISSING) compute-sanitizer not found on this machine")
fi
step "benchmarks" "$OUT/bench.log" $PY -m ddpm_fast bench --out "$OUT"

echo
echo "=== summary ($OUT)"
printf '%s\n' "${SUMMARY[@]}"
grep -E "^\| .*ddpm_fast" "$OUT"/bench-cuda.md 2>/dev/null || true
printf '%s\n' "${SUMMARY[@]}" | grep -q -E "FAIL|MISSING" && exit 1 || exit 0
