#!/usr/bin/env bash
# shellcheck disable=SC2317  # the check_* functions are called through chk, which shellcheck cannot see
# Validates ddpm-fast on a GPU machine (H100/H200) in calls that fit in 10 minutes each.
#
# Usage: [WHEELS=DIR] bash benchmarks/gpu_validate.sh [--dry-run] [--stage STAGE]... OUT_DIR
#        bash benchmarks/gpu_validate.sh --help
#
# Stages (--stage may be repeated or given a comma-separated list; they always run in this order):
#   build        reuse the extension in the tree when benchmarks/check_build.py --arch sm_90 passes (it
#                was built from this checkout's sources, for this torch, with CUDA and sm_90 code: one
#                carried from benchmarks/build_for_device.sh, or built by an earlier call on this warm
#                machine); else rm ddpm_fast/_C*.so, MAX_JOBS=$(nproc) pip install --no-build-isolation
#                --no-deps -v -e . and the same check, which must pass          (OUT/build.log)
#   build+tests  build, then one pytest run over tests/ without TRITON_INTERPRET, -m "$TEST_MARKERS"
#                (default "not compile_only": CI compiles every Triton kernel through ptxas; here they
#                run), -v, at most TESTS_CAP_S seconds (default 480), with -n 8 and a 300 s per-test limit
#                where pytest-xdist and pytest-timeout are installed, OMP_NUM_THREADS=2, the tests marked
#                `cuda` or `triton` first (so a stage that runs out of time loses CPU-only ones, which CI
#                runs); junit XML in OUT/tests.xml; fails if pytest fails or if no test marked `cuda`, or
#                none marked `triton` (the compile gate's, which run on a CPU, not counted), ran
#                                                          (OUT/build.log, OUT/tests.log, OUT/tests.xml)
#   sanitize     compute-sanitizer memcheck (half of the time left), then racecheck (the rest; a tool
#                left with under a minute is not run, and fails), over benchmarks/cuda_smoke.py's
#                CUDA kernels, then, with two minutes or more left, memcheck over its Triton kernels
#                (a note if left out or cut off), each with PYTORCH_NO_CUDA_MEMORY_CACHING=1: behind
#                the caching allocator memcheck cannot see a read past a tensor's end that stays
#                inside a cached block; each judged by benchmarks/sanitizer_verdict.py (the smoke
#                exited 0, the tool's summary is there and counts no memory error or hazard; CUDA API
#                errors, some of which PyTorch makes on purpose, are named, not counted)
#                                 (OUT/memcheck.log, OUT/racecheck.log, OUT/memcheck-triton.log)
#   profile      first the host/GPU split of the quick bench cases (torch.profiler, at most 150 s):
#                benchmarks/profile_host.py, OUT/profile/host-summary.md; then Nsight Compute (ncu
#                --clock-control none) over one call of each fused kernel, CUDA and Triton, at the
#                benchmarks' shapes: benchmarks/profile_kernels.py, its CSVs and a table of every
#                launch's key figures in OUT/profile/ncu-summary.md (OUT/profile.log)
#   bench-quick  python -m ddpm_fast bench --quick --device cuda --out OUT, at most 5 min (OUT/bench-quick.log)
#   bench        python -m ddpm_fast bench --device cuda --out OUT, the full record  (OUT/bench.log)
#   pack         everything in OUT -> OUT/gpu-results.tar.gz; fails over 16 MiB; then (not in a dry run)
#                removes from OUT all but the tarball and summary.txt (a device call returns 8 files)
#   all          build+tests, sanitize, profile, bench, pack: the default; over 20 minutes, so it does not
#                fit one 10-minute device call (run it with BUDGET_S=0 where time is not limited)
# sanitize, profile and bench* use the extension already built in this working tree (by build or build+tests,
# in this call or an earlier one on the same machine) and fail at once if there is none.
#
# Every call (but --dry-run) first writes OUT/gpu_env.txt: GPU, driver, nvcc, torch and its CUDA,
# triton, and what a mismatch between nvcc's and torch's CUDA major versions means.  With WHEELS=DIR
# it then installs from DIR (pip --no-index --find-links) whichever of diffusers, importlib_metadata,
# pytest, safetensors, matplotlib and scikit-learn is not importable (OUT/deps.log).
# Each stage ends with exactly one line, also appended to OUT/summary.txt (after a line per call):
#   stage NAME: ok|FAIL|dry-run SECONDSs (LOGS)[ - NOTES]
# Time: each command runs under `timeout` (SIGINT first, so pytest and the benchmark still write
# their partial results; one still running 15 s later is killed, a timeout too), capped per stage and
# by the call's budget, BUDGET_S seconds from the start (default 560; 0 = no budget), keeping 20 s for
# pack.  Exit status: 0 when every selected stage (and the WHEELS install) is ok, 1 otherwise, 2 for
# bad arguments.
# --dry-run: prints the commands each selected stage would run, writes a placeholder log per stage,
# and really runs pack; it runs no pip, pytest, sanitizer or benchmark and needs no GPU (CI runs it).
# BENCH_ONLY: passed to the bench stages as --only (comma-separated suites), to split the full record
# over calls that each fit, e.g. BENCH_ONLY=e2e,train in one and the other suites in another; read
# them together with python -m ddpm_fast.bench.targets A.json B.json.
# PROFILE_CASES: passed to profile_kernels.py as --cases (comma-separated; --list names them), to
# profile the kernels that matter first where the lease is short (ncu takes ~10 s a case).
# Other settings: PYTHON (default python3), MAX_JOBS, TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX",
# the CI build; "9.0" compiles one target instead of three), CUDA_HOME, TEST_MARKERS, TESTS_CAP_S,
# TRITON_CACHE_DIR.
#
# A lease is 15 minutes of device time for the whole session, the machine's start (a minute or more)
# included, and one call runs 10 minutes at most; a machine stays warm 30 s after a call, and a warm
# one keeps the ignored files a call left in the tree: the extension, and Triton's compiled kernels
# (TRITON_CACHE_DIR, default build/triton-cache).  So, before the first call, with no device time spent:
#   bash benchmarks/build_for_device.sh   # the extension for torch 2.11/Python 3.12/sm_90 (~10 min on
#                                         # 2 cores) and the wheels the machines lack, in .whl/
# then, carrying what its last line names, [".whl", "ddpm_fast/_C.cpython-312-x86_64-linux-gnu.so"].
# Seen on an H200 (2026-12-04): a start took ~30 s, build+tests with the carried extension 120 s (2562
# tests at -n 8), sanitize 90 s, and bench-quick over all suites ran past its 300 s inside e2e.
#   1. WHEELS=.whl TORCH_CUDA_ARCH_LIST=9.0 BUDGET_S=450 TESTS_CAP_S=200 \
#        TEST_MARKERS='(cuda or triton) and not compile_only' \
#        PROFILE_CASES=group_norm-cuda-bf16-256x128x32x32,group_norm-cuda-fp32-256x128x32x32,group_norm-cuda-bf16-1x128x32x32,group_norm_train-cuda-bf16-128x128x32x32,attention-cuda-bf16-64x1x256x256 \
#        bash benchmarks/gpu_validate.sh --stage build+tests,sanitize,profile,pack $OUT
#      (timeout_s 480; the build stage finds the carried extension and takes seconds, or, should
#      check_build refuse it there, rebuilds it for sm_90 alone; CI runs the CPU-only tests; leave
#      out sanitize when csrc/ is unchanged since benchmarks/results/h200/'s clean logs, and then
#      profile every case: drop PROFILE_CASES)
#   2. at once (a machine stays warm 30 s, and a fresh one does not start with under 4 minutes left),
#      carrying the same two paths again, with B = status's budget_left_s - 30 and timeout_s B + 25:
#      WHEELS=.whl TORCH_CUDA_ARCH_LIST=9.0 BUDGET_S=B BENCH_ONLY=e2e,group_norm,attention,p_step,q_sample \
#        bash benchmarks/gpu_validate.sh --stage build,bench-quick,pack $OUT
#   and give the machine back.  The suites left out and the full record go to later leases.
#   Read first: profile/host-summary.md (host or GPU-bound, each quick case), profile/ncu-summary.md.
# then: tar -xzf gpu-results.tar.gz; cat summary.txt (each stage's seconds: size the next lease by them)
set -uo pipefail

usage() { sed -n '3,/^set -uo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_validate.sh: error: $*" >&2; exit 2; }

ORDER=(build build+tests sanitize profile bench-quick bench pack)
declare -A WANT=()
DRY_RUN=0
OUT=
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --stage|--stage=*)
      if [ "$1" = --stage ]; then
        [ $# -ge 2 ] || die "--stage needs a value (${ORDER[*]} all)"
        list=$2; shift
      else
        list=${1#--stage=}
      fi
      IFS=, read -ra names <<<"$list"
      [ ${#names[@]} -gt 0 ] || die "--stage needs a value (${ORDER[*]} all)"
      for s in "${names[@]}"; do
        case $s in
          build|build+tests|sanitize|profile|bench-quick|bench|pack) WANT[$s]=1 ;;
          all) WANT[build+tests]=1; WANT[sanitize]=1; WANT[profile]=1; WANT[bench]=1; WANT[pack]=1 ;;
          *) die "unknown stage '$s' (stages: ${ORDER[*]} all)" ;;
        esac
      done ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$OUT" ] || die "one OUT_DIR only, got '$OUT' and '$1'"; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || die "missing OUT_DIR (see --help)"
[ ${#WANT[@]} -gt 0 ] || { WANT[build+tests]=1; WANT[sanitize]=1; WANT[profile]=1; WANT[bench]=1; WANT[pack]=1; }
[ -n "${WANT[build+tests]:-}" ] && unset 'WANT[build]'  # build+tests builds
BUDGET_S=${BUDGET_S:-560}
TEST_MARKERS=${TEST_MARKERS:-not compile_only}
TESTS_CAP_S=${TESTS_CAP_S:-480}
[[ $BUDGET_S =~ ^[0-9]+$ ]] || die "BUDGET_S must be a whole number of seconds, got '$BUDGET_S'"
[[ $TESTS_CAP_S =~ ^[0-9]+$ ]] || die "TESTS_CAP_S must be a whole number of seconds, got '$TESTS_CAP_S'"

# OUT and WHEELS are relative to the caller's directory; everything runs from the repository root.
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
WHEELS=${WHEELS:-}
if [ -n "$WHEELS" ]; then
  case $WHEELS in /*) ;; *) WHEELS=$PWD/$WHEELS ;; esac
  [ -d "$WHEELS" ] || die "WHEELS=$WHEELS is not a directory"
fi
cd "$(dirname "$0")/.." || die "cannot cd to the repository root"
ROOT=$PWD
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)

PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # later stages import the build in this tree
export PYTHONUNBUFFERED=1
# In the tree, ignored: a second call on a warm machine finds the kernels the first one compiled.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/build/triton-cache}
# Same rule as setup.py, so the nvcc reported below is the one the build uses.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PACK_RESERVE=20
TMP=$(mktemp -d) || die "mktemp failed"
trap 'rm -rf "$TMP"' EXIT
EXIT=0

# ---------------------------------------------------------------- helpers
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

limit_for() {  # limit_for CAP: seconds a command may run, CAP or what is left of BUDGET_S
  local left
  [ "$BUDGET_S" -eq 0 ] && { echo "$1"; return; }
  left=$((BUDGET_S - SECONDS - PACK_RESERVE))
  echo $((left < $1 ? left : $1))
}

cmd() {  # cmd LOG CAP COMMAND...: print COMMAND; unless --dry-run run it under timeout, output appended to LOG
  local log=$1 limit rc t0
  limit=$(limit_for "$2"); shift 2
  LAST_LOG=$log
  show timeout -s INT -k 15 "$limit" "$@"
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: would run: $*" >>"$log"; return 0; fi
  if [ "$limit" -lt 10 ]; then echo "not run: no time left in BUDGET_S=$BUDGET_S" | tee -a "$log"; return 124; fi
  echo "+ $* (limit ${limit}s)" >>"$log"
  t0=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  # 137: still running 15 s after the SIGINT, so killed; a timeout all the same
  [ $rc -eq 137 ] && [ $((SECONDS - t0)) -ge "$limit" ] && rc=124
  [ $rc -eq 124 ] && echo "TIMED OUT after ${limit}s" | tee -a "$log"
  return $rc
}

chk() {  # chk LOG WHAT FUNCTION [ARGS]...: run a quick check unless --dry-run; its last line goes to CHECK_MSG
  local log=$1 what=$2 out rc; shift 2
  echo "+ check: $what"
  if [ "$DRY_RUN" = 1 ]; then echo "dry run: would check: $what" >>"$log"; CHECK_MSG=; return 0; fi
  out=$("$@" 2>&1); rc=$?
  printf '%s\n' "$out" | tee -a "$log"
  CHECK_MSG=$(printf '%s\n' "$out" | tail -n 1)
  return $rc
}

begin() { STAGE=$1; T0=$SECONDS; FAILED=0; NOTES=; SIMULATED=$DRY_RUN; LAST_LOG=; echo; echo "=== stage $1"; }
note() { NOTES=${NOTES:+$NOTES; }$*; }
fail() { FAILED=1; note "$@"; }
end() {  # end LOG...: print the stage's summary line and append it to OUT/summary.txt
  local status=ok logs line
  [ "$SIMULATED" = 1 ] && status=dry-run
  [ "$FAILED" = 1 ] && status=FAIL && EXIT=1
  if [ "$FAILED" = 1 ] && [ "$DRY_RUN" = 0 ] && [ -s "$LAST_LOG" ]; then
    echo "--- last 30 lines of $LAST_LOG"; tail -n 30 "$LAST_LOG"; echo "---"
  fi
  logs=$(printf '%s, ' "$@"); logs=${logs%, }
  line="stage $STAGE: $status $((SECONDS - T0))s ($logs)${NOTES:+ - $NOTES}"
  echo "$line"; echo "$line" >>"$OUT/summary.txt"
}

find_tool() {  # find_tool NAME: a CUDA tool on PATH, in CUDA_HOME, /usr/local/cuda or the nvidia-* wheels
  local p
  for p in "$(command -v "$1")" "${CUDA_HOME:-/usr/local/cuda}/bin/$1" "/usr/local/cuda/bin/$1"; do
    [ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return 0; }
  done
  "$PY" - "$1" 2>/dev/null <<'PY'
import glob, os, sys
import nvidia  # namespace package of the nvidia-* wheels, e.g. nvidia/cu13/bin/cuobjdump
for root in nvidia.__path__:
    for p in sorted(glob.glob(os.path.join(root, "*", "bin", sys.argv[1]))
                    + glob.glob(os.path.join(root, "*", "compute-sanitizer", sys.argv[1]))):
        if os.access(p, os.X_OK):
            sys.exit(print(p))
sys.exit(1)
PY
}

# ---------------------------------------------------------------- checks (each prints its verdict last)
check_build() {  # benchmarks/check_build.py --arch sm_90: this checkout's extension, for this torch, with CUDA
  local tool
  tool=$(find_tool cuobjdump) || { echo "cuobjdump not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin, nvidia wheels)"; return 1; }
  "$PY" benchmarks/check_build.py --arch sm_90 --cuobjdump "$tool"
}

check_cuda_ready() {
  "$PY" -c '
import ddpm_fast._ext as e
s = e.cuda_status()
print("BUILD_INFO:", e.BUILD_INFO)
hint = "" if e.BUILD_INFO and e.BUILD_INFO["cuda"] else ": run the build stage first, in this call (a fresh machine keeps no build)"
raise SystemExit(0 if s is True else f"no usable CUDA extension ({s}){hint}")'
}

write_marker_plugin() {  # a pytest plugin recording each test's cuda/triton marker as a junit property
  cat >"$TMP/gv_markers.py" <<'PY'
def pytest_collection_modifyitems(items):
    for item in items:
        for name in ("cuda", "triton"):
            if item.get_closest_marker(name):
                item.user_properties.append(("marker", name))
PY
}

check_tests_xml() {  # check_tests_xml XML: counts; fails unless some cuda- and some triton-marked test ran
  "$PY" - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET
from collections import Counter

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(f"no readable junit XML ({e})")
outcomes, ran, skipped, reasons = Counter(), Counter(), Counter(), Counter()
for case in root.iter("testcase"):
    if "test_compile_gate" in case.get("classname", ""):
        continue  # triton-marked, but it compiles on the CPU: it says nothing of the GPU's Triton
    outcome, why = "passed", ""
    for child in case:
        if child.tag in ("failure", "error"):
            outcome = "failed"
        elif child.tag == "skipped" and outcome == "passed":
            outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
            why = child.get("message", "")
    outcomes[outcome] += 1
    for p in case.iter("property"):
        if p.get("name") == "marker":
            m = p.get("value")
            if outcome == "skipped":
                skipped[m] += 1
                reasons[(m, why)] += 1
            else:
                ran[m] += 1
for (m, why), n in reasons.most_common(15):
    print(f"skipped {m}-marked: {n} x {why}")
counts = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
msg = f"tests: {counts}; cuda-marked: {ran['cuda']} ran, {skipped['cuda']} skipped; " \
      f"triton-marked: {ran['triton']} ran, {skipped['triton']} skipped"
missing = [m for m in ("cuda", "triton") if not ran[m]]
if missing:
    sys.exit(f"no {' and no '.join(missing)}-marked test ran ({msg})")
print(msg)
PY
}

# ---------------------------------------------------------------- environment
env_report() {
  local tv nv
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null; then
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1)"
    echo "driver supports up to $(nvidia-smi 2>&1 | grep -o 'CUDA Version: *[0-9.]*' || echo 'CUDA Version: ?')"
  else
    echo "gpu: nvidia-smi not found"
  fi
  "$PY" - <<'PY' || echo "python: $PY failed to import torch"
import sys, importlib.metadata as md, importlib.util
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "| torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for dist in ("triton", "pytest", "pytest-xdist", "diffusers", "numpy"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "NOT INSTALLED")
PY
  echo "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset (setup.py: 8.0;9.0+PTX)} MAX_JOBS=$MAX_JOBS TRITON_INTERPRET=${TRITON_INTERPRET:-unset} TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
  NVCC=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
  [ -x "${NVCC:-}" ] || NVCC=$(command -v nvcc || true)
  nv=$([ -n "$NVCC" ] && "$NVCC" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p')
  tv=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)
  echo "nvcc: ${NVCC:-not found} (CUDA ${nv:-?})"
  echo "cuobjdump: $(find_tool cuobjdump || echo 'not found')"
  echo "compute-sanitizer: $(find_tool compute-sanitizer || echo 'not found')"
  if [ -z "$tv" ]; then
    echo "WARNING: torch.version.cuda is empty (a CPU build of torch, or torch does not import): the extension builds without CUDA and the build stage fails. Install a CUDA build of torch."
  elif [ -z "$nv" ]; then
    echo "WARNING: no nvcc found (CUDA_HOME, PATH): setup.py then builds a CPU-only extension and the build stage fails. Install the CUDA $tv toolkit or set CUDA_HOME to one."
  elif [ "${nv%%.*}" != "${tv%%.*}" ]; then
    cat <<EOF
WARNING: nvcc is CUDA $nv but torch was built with CUDA $tv: the major versions differ.
  What it means: torch.utils.cpp_extension refuses to build an extension when nvcc's major version
  differs from torch.version.cuda's ("The detected CUDA version ($nv) mismatches the version that
  was used to compile PyTorch ($tv)"), so the build stage will fail; an extension forced through
  would need a CUDA runtime other than the one torch loads, or hold code this driver cannot load.
  What to do: set CUDA_HOME to a toolkit matching torch.version.cuda ($tv) and run again
  (toolkits here: $(printf '%s ' /usr/local/cuda-*)), or install the torch build
  for CUDA $nv (the cu${nv//./} wheels).
EOF
  elif [ "$nv" != "$tv" ]; then
    echo "note: nvcc CUDA $nv vs torch CUDA $tv: same major version, which torch accepts (minor differences only warn)."
  fi
}

install_wheels() {  # pip-installs from WHEELS whichever of these modules is not importable
  local mod dist missing=() rc=0
  for mod in diffusers:diffusers importlib_metadata:importlib_metadata pytest:pytest \
             safetensors:safetensors matplotlib:matplotlib sklearn:scikit-learn; do
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${mod%%:*}') is None)" 2>/dev/null \
      || missing+=("${mod#*:}")
  done
  echo "missing: ${missing[*]:-nothing}"
  for dist in ${missing[@]+"${missing[@]}"}; do
    show "$PY" -m pip install --no-index --find-links "$WHEELS" "$dist"
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$dist" || { echo "FAILED: $dist"; rc=1; }
  done
  return $rc
}

# ---------------------------------------------------------------- stages
do_build() {  # reuse the extension in the tree if check_build passes, else build it; failures go to the notes
  local log=$OUT/build.log rc
  if [ "$DRY_RUN" = 0 ] && ls ddpm_fast/_C*.so >/dev/null 2>&1; then
    if chk "$log" "the extension in the tree is this checkout's, for this torch, with sm_90 (check_build.py)" check_build; then
      note "build: reused $(ls ddpm_fast/_C*.so), $(grep '^built from' "$log" | tail -n 1)"
      return 0
    fi
    note "build: not reused ($(grep -m1 '^FAIL' "$log" | cut -c1-160))"
  fi
  echo "+ rm -f ddpm_fast/_C*.so"  # a stale .so must not stand in for a failed build
  [ "$DRY_RUN" = 1 ] || rm -f ddpm_fast/_C*.so
  cmd "$log" 420 env MAX_JOBS="$MAX_JOBS" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  rc=$?
  if [ $rc -ne 0 ]; then fail "build: pip install failed (rc $rc$([ $rc -eq 124 ] && echo ', timed out'))"; return 1; fi
  chk "$log" "the new extension is this checkout's, for this torch, with sm_90 (check_build.py)" check_build \
    || { fail "build: $CHECK_MSG"; return 1; }
  [ -n "$CHECK_MSG" ] && note "build: $CHECK_MSG"
  return 0
}

stage_build() {
  begin build
  : >"$OUT/build.log"
  do_build
  end "$OUT/build.log"
}

stage_build_tests() {
  begin build+tests
  local log=$OUT/tests.log rc opts=()
  : >"$OUT/build.log"; : >"$log"
  do_build  # the tests still run after a failed build: they show what works without it
  write_marker_plugin
  "$PY" -c 'import xdist' 2>/dev/null && opts=(-n 8)
  # a test stuck in the driver ends its worker, not the call (xdist starts another)
  "$PY" -c 'import pytest_timeout' 2>/dev/null && opts+=(--timeout 300 --timeout-method thread)
  rm -f "$OUT/tests.xml"
  # OMP_NUM_THREADS: 8 workers of 2 CPU threads each, as CI's 2 cores, not 8 x 16 on 16 cores
  # -v: each result is in the log as it comes, should the run be cut off before pytest's summary
  cmd "$log" "$TESTS_CAP_S" env -u TRITON_INTERPRET OMP_NUM_THREADS=2 PYTHONPATH="$TMP:$PYTHONPATH" "$PY" -m pytest tests -v \
    -m "$TEST_MARKERS" ${opts[@]+"${opts[@]}"} -p gv_markers -p no:cacheprovider --junitxml="$OUT/tests.xml"
  rc=$?
  [ $rc -eq 0 ] || fail "pytest rc $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
  if chk "$log" "$OUT/tests.xml: some cuda- and some triton-marked tests ran (not skipped)" check_tests_xml "$OUT/tests.xml"; then
    [ -n "$CHECK_MSG" ] && note "$CHECK_MSG"
  else
    fail "$CHECK_MSG"
  fi
  end "$OUT/build.log" "$log" "$OUT/tests.xml"
}

stage_sanitize() {
  begin sanitize
  local tool run t backend log rc logs=()
  # RUN = tool:backend:log; the last, the Triton kernels under memcheck, runs only with the time left
  local runs=(memcheck:cuda:memcheck racecheck:cuda:racecheck memcheck:triton:memcheck-triton)
  for run in "${runs[@]}"; do : >"$OUT/${run##*:}.log"; logs+=("$OUT/${run##*:}.log"); done
  if ! chk "$OUT/memcheck.log" "the CUDA extension is built and a GPU is visible" check_cuda_ready; then
    fail "$CHECK_MSG"; end "${logs[@]}"; return
  fi
  tool=compute-sanitizer
  if [ "$DRY_RUN" = 0 ] && ! tool=$(find_tool compute-sanitizer); then
    fail "compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin, nvidia wheels)"; end "${logs[@]}"; return
  fi
  for run in "${runs[@]}"; do
    IFS=: read -r t backend log <<<"$run"
    log=$OUT/$log.log
    local t1=$SECONDS cap=300 left need=60
    # the CUDA memcheck gets half of what is left (a minute at least, where there is one), so
    # racecheck is not left with nothing; a run with under a minute would not get past importing
    # torch under the sanitizer, and the Triton one, optional, also compiles its kernels first
    if [ "$run" = memcheck:cuda:memcheck ] && [ "$BUDGET_S" -gt 0 ]; then
      left=$(limit_for 600)
      cap=$((left / 2)); [ "$cap" -lt 60 ] && cap=$((left < 60 ? left : 60))
    fi
    cap=$(limit_for "$cap")
    [ "$backend" = cuda ] || need=120
    if [ "$DRY_RUN" = 0 ] && [ "$BUDGET_S" -gt 0 ] && [ "$cap" -lt "$need" ]; then
      echo "not run: ${cap}s left in BUDGET_S=$BUDGET_S" >>"$log"
      if [ "$backend" = cuda ]; then fail "$t not run (${cap}s left)"; else note "$t $backend not run (${cap}s left)"; fi
      continue
    fi
    # no --error-exitcode: rc is the smoke's own, and the verdict reads the tool's summary
    cmd "$log" "$cap" env -u TRITON_INTERPRET PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool "$t" \
      "$PY" benchmarks/cuda_smoke.py --backend "$backend"
    rc=$?
    if [ "$DRY_RUN" = 1 ]; then
      :
    elif chk "$log" "$t $backend: the smoke exited 0 and the summary counts no memory error or hazard" \
        "$PY" benchmarks/sanitizer_verdict.py "$t" "$log" "$rc"; then
      note "$t $backend ok $((SECONDS - t1))s: $CHECK_MSG"
    elif [ "$backend" != cuda ] && [ $rc -eq 124 ]; then
      note "$t $backend not finished in ${cap}s (optional)"
    else
      fail "$t $backend FAIL $((SECONDS - t1))s (rc $rc$([ $rc -eq 124 ] && echo ', timed out')): $CHECK_MSG"
      grep -q 'Device not supported' "$log" 2>/dev/null \
        && note "compute-sanitizer says 'Device not supported' (seen on gVisor machines; Firecracker ones work)"
    fi
  done
  end "${logs[@]}"
}

stage_profile() {
  begin profile
  local log=$OUT/profile.log tool=ncu rc
  : >"$log"
  if ! chk "$log" "the CUDA extension is built and a GPU is visible" check_cuda_ready; then
    fail "$CHECK_MSG"; end "$log"; return
  fi
  # The host/GPU split first: it needs no hardware counters, and it is what explains the small cases.
  cmd "$log" 150 "$PY" benchmarks/profile_host.py "$OUT/profile"
  rc=$?
  [ "$DRY_RUN" = 0 ] && [ $rc -ne 0 ] && fail "profile_host.py rc $rc$([ $rc -eq 124 ] && echo ', timed out')"
  if [ "$DRY_RUN" = 0 ] && ! tool=$(find_tool ncu); then
    fail "ncu not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin, nvidia wheels)"
    end "$log" "$OUT/profile/host-summary.md"; return
  fi
  cmd "$log" 300 "$PY" benchmarks/profile_kernels.py --ncu "$tool" ${PROFILE_CASES:+--cases "$PROFILE_CASES"} \
    "$OUT/profile"
  rc=$?
  if [ "$DRY_RUN" = 0 ] && [ $rc -ne 0 ]; then
    fail "ncu rc $rc$([ $rc -eq 124 ] && echo ', timed out'): $(grep -c 'FAILED' "$log") cases failed"
    grep -qE 'LibraryNotLoaded|ERR_NVGPUCTRPERM' "$OUT"/profile/*.log 2>/dev/null \
      && note "ncu cannot read the hardware counters here (seen on gVisor machines; Firecracker ones work)"
  fi
  end "$log" "$OUT/profile/host-summary.md" "$OUT/profile/ncu-summary.md"
}

stage_bench() {  # stage_bench NAME CAP [--quick]
  local name=$1 cap=$2 log=$OUT/$1.log rc result; shift 2
  begin "$name"
  result=$OUT/bench-cuda$([ $# -gt 0 ] && echo -quick).json
  : >"$log"
  if ! chk "$log" "the CUDA extension is built and a GPU is visible" check_cuda_ready; then
    fail "$CHECK_MSG"; end "$log"; return
  fi
  cmd "$log" "$cap" "$PY" -m ddpm_fast bench "$@" ${BENCH_ONLY:+--only "$BENCH_ONLY"} --device cuda --out "$OUT"
  rc=$?
  case $rc in
    0) ;;
    124) fail "timed out: the cases finished are in $result" ;;
    *) fail "rc $rc: $(grep -E 'cases failed|not importable' "$log" | tail -n 2 | tr '\n' ' ')" ;;
  esac
  [ "$DRY_RUN" = 1 ] || [ -s "$result" ] || fail "no $result"
  end "$log" "$result"
}

stage_pack() {
  begin pack
  SIMULATED=0  # packing runs in a dry run too
  local tgz=$OUT/gpu-results.tar.gz size files
  show tar -C "$OUT" --exclude=gpu-results.tar.gz -czf "$tgz" .
  if tar -C "$OUT" --exclude=gpu-results.tar.gz -czf "$TMP/pack.tar.gz" . && mv -f "$TMP/pack.tar.gz" "$tgz"; then
    size=$(stat -c %s "$tgz")
    files=$(tar -tzf "$tgz" | grep -vc '/$')
    note "$files files, $((size / 1024)) KiB"
    if [ "$size" -gt $((16 * 1024 * 1024)) ]; then
      fail "over 16 MiB: it will not come back from a device call"
    elif [ "$DRY_RUN" = 0 ]; then
      # a device call brings back 8 files of OUT: the tarball holds them all, summary.txt says how it went
      find "$OUT" -mindepth 1 -maxdepth 1 ! -name gpu-results.tar.gz ! -name summary.txt -exec rm -rf {} +
      note "OUT holds only it and summary.txt"
    fi
  else
    fail "tar failed"
  fi
  end "$tgz"
}

# ---------------------------------------------------------------- main
STAGES=$(for s in "${ORDER[@]}"; do [ -n "${WANT[$s]:-}" ] && printf '%s ' "$s"; done)
echo "gpu_validate.sh: stages ${STAGES}-> $OUT$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) gpu_validate.sh$([ "$DRY_RUN" = 1 ] && echo ' --dry-run') stages: $STAGES" >>"$OUT/summary.txt"
if [ "$DRY_RUN" = 1 ]; then
  echo "+ environment report (nvidia-smi, nvcc --version, torch, triton) > $OUT/gpu_env.txt"
  echo "dry run: the environment was not probed" >"$OUT/gpu_env.txt"
  [ -z "$WHEELS" ] || echo "+ $PY -m pip install --no-index --find-links $WHEELS DIST (for each of diffusers importlib_metadata pytest safetensors matplotlib scikit-learn not importable) > $OUT/deps.log"
else
  env_report 2>&1 | tee "$OUT/gpu_env.txt"
  if [ -n "$WHEELS" ]; then
    if install_wheels >"$OUT/deps.log" 2>&1; then
      echo "deps: ok ($(head -n 1 "$OUT/deps.log"); $OUT/deps.log)" | tee -a "$OUT/summary.txt"
    else
      echo "deps: FAIL ($(grep FAILED "$OUT/deps.log" | tr '\n' ' ')$OUT/deps.log)" | tee -a "$OUT/summary.txt"
      EXIT=1
    fi
  fi
fi

[ -n "${WANT[build]:-}" ] && stage_build
[ -n "${WANT[build+tests]:-}" ] && stage_build_tests
[ -n "${WANT[sanitize]:-}" ] && stage_sanitize
[ -n "${WANT[profile]:-}" ] && stage_profile
[ -n "${WANT[bench-quick]:-}" ] && stage_bench bench-quick 300 --quick
[ -n "${WANT[bench]:-}" ] && stage_bench bench 540
[ -n "${WANT[pack]:-}" ] && stage_pack
exit $EXIT
