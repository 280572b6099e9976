"""Is the extension in this checkout the one to test?  One line per check, the verdict last.

    python benchmarks/check_build.py [--arch sm_90[,sm_80...] --cuobjdump PATH]

Checks, in order, stopping at the first that fails (exit status 1; 0 when all pass):
  1. ddpm_fast._C imports (for this Python: its file name carries the interpreter's tag);
  2. it was built with CUDA and with OpenMP;
  3. for the torch that imports it (build_info()["torch"] against torch.__version__ less its local part);
  4. from this checkout's sources (build_info()["sources"] against ddpm_fast/_sources.py's digest of csrc/
     and setup.py): an older build would run older kernels;
  5. with --arch, `cuobjdump --list-elf` finds a cubin of each arch named.
.ci/run checks its builds with it; benchmarks/gpu_validate.sh reuses an extension that passes (one
carried to the GPU machine from benchmarks/build_for_device.sh, or built by an earlier call on the same
machine) instead of building it again.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's ddpm_fast, whatever the caller's directory


def checks(archs, cuobjdump):
    """Yields (ok, message) per check, stopping after the first failure."""
    import torch

    from ddpm_fast import _ext

    if _ext._C is None:
        yield False, f"ddpm_fast._C does not import: {_ext.IMPORT_ERROR}"
        return
    info = _ext.BUILD_INFO
    yield True, f"ddpm_fast._C: {_ext._C.__file__}"
    yield True, f"build_info: {info}"
    if not info["cuda"]:
        yield False, "built WITHOUT CUDA (no nvcc/CUDA_HOME at build time, or a CPU build of torch)"
        return
    if not info["openmp"]:
        yield False, "built without OpenMP"
        return
    runtime = torch.__version__.split("+")[0]
    if info["torch"] != runtime:
        yield False, f"built for torch {info['torch']}, but torch {torch.__version__} imports it"
        return
    stale = _ext.stale_reason(info)
    if stale or _ext.CHECKOUT_SOURCES is None:
        yield False, stale or f"no csrc/ and setup.py beside {os.path.dirname(_ext.__file__)} to compare with"
        return
    yield True, f"built from this checkout's sources ({info['sources']}) for torch {runtime}, CUDA {info['cuda_version']}"
    if archs:
        r = subprocess.run([cuobjdump, "--list-elf", _ext._C.__file__], capture_output=True, text=True)
        if r.returncode != 0:
            yield False, f"{cuobjdump} --list-elf failed: {r.stderr.strip()}"
            return
        found = sorted(set(re.findall(r"\bsm_\d+a?\b", r.stdout)))
        missing = [a for a in archs if a not in found]
        if missing:
            yield False, f"no {', '.join(missing)} code in the extension (cubins: {' '.join(found) or 'none'})"
            return
        yield True, f"cubins: {' '.join(found)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="", help="comma-separated cubin archs that must be there, e.g. sm_80,sm_90")
    p.add_argument("--cuobjdump", help="the cuobjdump to list the cubins with (needed with --arch)")
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if archs and not args.cuobjdump:
        p.error("--arch needs --cuobjdump PATH")
    bad = [a for a in archs if not re.fullmatch(r"sm_\d+a?", a)]
    if bad:
        p.error(f"--arch: expected names like sm_90, got {bad[0]!r}")
    ok = True
    for ok, message in checks(archs, args.cuobjdump):
        print(message if ok else f"FAIL: {message}")
    if ok:
        print("the extension is this checkout's, built with CUDA" + (f" for {', '.join(archs)}" if archs else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
