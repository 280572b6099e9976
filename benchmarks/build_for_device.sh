#!/usr/bin/env bash
# Builds ddpm_fast._C here, for the GPU machines, so that a device call carries the extension instead of
# building it on the lease's time (minutes of it; here it costs none).  CI uses the same environment.
#
# Usage: bash benchmarks/build_for_device.sh [--env]
#   1. a venv of requirements/device.txt on Python 3.12, the GPU machines' stack (python3 3.12, torch
#      2.11.0+cu130, triton 3.6.0), cached under $DDPM_FAST_CI_CACHE (default ~/.cache/ddpm-fast-ci) by
#      the requirements' hash; with --env, only this, and its path printed
#   2. TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e . in it, which writes
#      ddpm_fast/_C.cpython-312-x86_64-linux-gnu.so (sm_90 only: the GPU machines are H100/H200)
#   3. benchmarks/check_build.py --arch sm_90 in it: the .so imports under torch 2.11, with CUDA, from
#      this checkout's sources
#   4. the wheels of requirements/device-wheels.txt (what the GPU machines lack) downloaded into .whl/
# The last line is the device tool's `carry` list: .whl/ and the .so, which benchmarks/gpu_validate.sh's
# build stage reuses when check_build.py passes there (it builds only when it does not).
# Settings: PYTHON312 (default: python3.12, else the newest pyenv 3.12), MAX_JOBS, CUDA_HOME (default
# /usr/local/cuda).  About 10 minutes on 2 cores; a rebuild after a change recompiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${DDPM_FAST_CI_CACHE:-$HOME/.cache/ddpm-fast-ci}
REQ=requirements/device.txt
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PIP_DISABLE_PIP_VERSION_CHECK=1

ENV_ONLY=0
case ${1:-} in
  --env) ENV_ONLY=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "build_for_device.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

python312() {  # an interpreter of Python 3.12 that runs (pyenv's shims name versions that are not active)
  local p
  for p in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
           $(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    [ -n "$p" ] && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$p"; return 0; }
  done
  echo "build_for_device.sh: error: no Python 3.12 found (set PYTHON312): the GPU machines run 3.12" >&2
  return 1
}

PY=$(python312)
key=$( (cat "$REQ"; "$PY" --version) | sha256sum | cut -c1-16)
ENV=$CACHE/device-$key
if [ ! -f "$ENV/.complete" ]; then
  echo "creating $ENV ($("$PY" --version), $REQ)" >&2
  rm -rf "$ENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$ENV" >&2
  "$ENV/bin/pip" install -q -r "$REQ" >&2
  touch "$ENV/.complete"
fi
if [ "$ENV_ONLY" = 1 ]; then echo "$ENV"; exit 0; fi

"$ENV/bin/python" -c 'import torch; print("device env:", torch.__version__, "CUDA", torch.version.cuda)'
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$ENV/bin/pip" install -q --no-build-isolation --no-deps -e .
CUOBJDUMP=$("$ENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "bin", "cuobjdump"))')
"$ENV/bin/python" benchmarks/check_build.py --arch sm_90 --cuobjdump "$CUOBJDUMP"
SO=$("$ENV/bin/python" -c 'import sysconfig; print("ddpm_fast/_C" + sysconfig.get_config_var("EXT_SUFFIX"))')
"$ENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl -r requirements/device-wheels.txt
echo "wheels: $(cd .whl && ls -- *.whl | paste -sd ' ')"
echo "carry: [\".whl\", \"$SO\"] ($(du -cm .whl "$SO" | tail -n 1 | cut -f1) MB)"
