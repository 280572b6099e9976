"""benchmarks/sanitizer_verdict.py on logs in compute-sanitizer's documented formats (no GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sanitizer_verdict import verdict  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sanitizer_verdict.py"
SMOKE = "philox_randn torch.float32: max abs diff 0.00e+00 ok\ncuda smoke: all ok\n"
API = ('========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to '
       'cudaFuncSetAttribute.\n=========     Saved host backtrace up to driver entry point at error\n'
       '=========     Host Frame: [0x480996]\n=========                in /lib/x86_64-linux-gnu/libcuda.so.1\n')
READ = ("========= Invalid __global__ read of size 4 bytes\n=========     at gn_stats+0x120\n"
        "=========     by thread (0,0,0) in block (3,0,0)\n=========     Access to 0x7f00 is out of bounds\n")


def log(*parts, summary):
    return "========= COMPUTE-SANITIZER\n" + "".join(parts) + SMOKE + f"========= {summary}\n"


@pytest.mark.parametrize("text, rc, clean, says", [
    (log(summary="ERROR SUMMARY: 0 errors"), 0, True, "0 memory error(s)"),
    # an API error PyTorch made and cleared: named, not counted
    (log(API, summary="ERROR SUMMARY: 1 error"), 0, True, "1 CUDA API error(s) not counted (1 x cudaFuncSetAttribute"),
    (log(API, READ, summary="ERROR SUMMARY: 2 errors"), 0, False, "1 memory error(s)"),
    (log(READ, summary="ERROR SUMMARY: 1 error"), 0, False, "1 memory error(s)"),
    # more errors than the log prints: those not shown count as memory errors
    (log(API, API, summary="ERROR SUMMARY: 250 errors"), 0, False, "248 memory error(s)"),
    (log(summary="ERROR SUMMARY: 0 errors"), 1, False, "cuda_smoke.py exited 1"),
    ("========= COMPUTE-SANITIZER\n" + SMOKE + "TIMED OUT after 90s\n", 124, False, "no ERROR SUMMARY"),
    # a clean summary of a run that checked nothing
    ("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n", 0, False, "did not run to its end"),
    ("========= COMPUTE-SANITIZER\n========= Error: No attachable process found. compute-sanitizer timed-out.\n"
     + SMOKE + "========= ERROR SUMMARY: 0 errors\n", 0, False, "an error of its own: No attachable process found"),
])
def test_memcheck(text, rc, clean, says):
    ok, why = verdict("memcheck", text, rc)
    assert ok is clean and says in why, why


@pytest.mark.parametrize("summary, rc, clean, says", [
    ("RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", 0, True, "0 hazard error(s)"),
    ("RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)", 0, False, "1 hazard error(s)"),
    ("Error: Race reported between Write access at gn_stats+0x1a0\n=========     and Read access at "
     "gn_stats+0x1c0 [4 hazards]\n========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)", 0, False,
     "1 hazard error(s)"),
    ("RACECHECK SUMMARY: 3 hazards displayed (0 errors, 3 warnings)", 0, True, "3 hazard warning(s) (not counted)"),
    ("RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", 1, False, "cuda_smoke.py exited 1"),
    ("ERROR SUMMARY: 0 errors", 0, False, "no RACECHECK SUMMARY"),
])
def test_racecheck(summary, rc, clean, says):
    ok, why = verdict("racecheck", log(summary=summary), rc)
    assert ok is clean and says in why, why


def test_command_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)

    good, bad = tmp_path / "good.log", tmp_path / "bad.log"
    good.write_text(log(API, summary="ERROR SUMMARY: 1 error"))
    bad.write_text(log(READ, summary="ERROR SUMMARY: 1 error"))
    r = run("memcheck", str(good), "0")
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "0 memory error(s)" in r.stdout
    r = run("memcheck", str(bad), "0")
    assert r.returncode == 1 and "1 memory error(s)" in r.stdout
    assert run("memcheck", str(tmp_path / "missing.log"), "0").returncode == 1
    for args in (("initcheck", str(good), "0"), ("memcheck", str(good), "zero"), ("memcheck",)):
        r = run(*args)
        assert r.returncode == 2 and r.stderr, args
