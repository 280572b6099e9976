"""benchmarks/gpu_validate.sh, exercised through --dry-run: argument parsing, stage selection, the
commands it would run, one summary line per stage, and the real pack step; and the sanitize stage's
real path with stand-ins for compute-sanitizer and the GPU.  Runs no GPU work."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_validate.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")


def run(args, cwd, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("WHEELS", "BUDGET_S")}
    e.update({"PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=60)


def summary(stdout):
    """{stage: (status, the whole line)} from the 'stage NAME: STATUS ...' lines, checking each stage has one."""
    lines = re.findall(r"^stage (\S+): (ok|FAIL|dry-run) \d+s \((.*)$", stdout, re.M)
    names = [name for name, _, _ in lines]
    assert len(names) == len(set(names)), stdout
    return {name: status for name, status, _ in lines}, names


def members(tgz):
    with tarfile.open(tgz) as t:
        return {os.path.normpath(m.name) for m in t.getmembers() if m.isfile()}


def test_help():
    r = run(["--help"], cwd=SCRIPT.parent)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and "--dry-run" in r.stdout and "OUT_DIR" in r.stdout
    for stage in ("build+tests", "sanitize", "profile", "bench-quick", "bench", "pack", "all"):
        assert f"  {stage} " in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--stage", "nope", "out"], "unknown stage 'nope'"),
    (["--dry-run", "--stage=build,,pack", "out"], "unknown stage ''"),
    (["--dry-run", "out", "--stage"], "--stage needs a value"),
    (["--dry-run", "--frobnicate", "out"], "unknown option --frobnicate"),
    (["--dry-run"], "missing OUT_DIR"),
    (["--dry-run", "a", "b"], "one OUT_DIR only"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    r = run(args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and message in r.stderr and r.stderr.startswith("gpu_validate.sh: error:")
    assert not (tmp_path / "out").exists() and r.stdout == ""


def test_dry_run_all_stages(tmp_path):
    r = run(["--dry-run", "out"], cwd=tmp_path, TRITON_INTERPRET="1")  # no --stage: all
    assert r.returncode == 0, r.stdout + r.stderr
    status, order = summary(r.stdout)
    assert order == ["build+tests", "sanitize", "profile", "bench", "pack"]
    assert status == {"build+tests": "dry-run", "sanitize": "dry-run", "profile": "dry-run", "bench": "dry-run",
                      "pack": "ok"}
    out = tmp_path / "out"
    # the commands it would run: a build that is checked, pytest without TRITON_INTERPRET, sanitizers
    # without the caching allocator, ncu over the kernels, the full benchmark on the GPU
    assert "pip install --no-build-isolation --no-deps -v -e ." in r.stdout
    assert "check: the new extension is this checkout's, for this torch, with sm_90 (check_build.py)" in r.stdout
    pytest_cmd = next(line for line in r.stdout.splitlines() if " -m pytest " in line)
    assert "-u TRITON_INTERPRET" in pytest_cmd and "TRITON_INTERPRET=1" not in pytest_cmd
    assert "OMP_NUM_THREADS=2" in pytest_cmd and re.search(r" -m not\\ compile_only ", pytest_cmd)
    assert f"--junitxml={out}/tests.xml" in pytest_cmd
    sanitizers = [line for line in r.stdout.splitlines() if " --tool " in line]
    assert [re.search(r"--tool (\w+) .* --backend (\w+)$", line).groups() for line in sanitizers] == [
        ("memcheck", "cuda"), ("racecheck", "cuda"), ("memcheck", "triton")]
    for line in sanitizers:
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in line and "-u TRITON_INTERPRET" in line
        assert "benchmarks/cuda_smoke.py --backend" in line
    profile = [line for line in r.stdout.splitlines() if "benchmarks/profile_" in line]
    assert len(profile) == 2 and profile[0].endswith(f"benchmarks/profile_host.py {out}/profile")
    assert profile[1].endswith(f"benchmarks/profile_kernels.py --ncu ncu {out}/profile")
    bench = next(line for line in r.stdout.splitlines() if " -m ddpm_fast bench" in line)
    assert "--quick" not in bench and f"--out {out}" in bench and "--device cuda" in bench
    assert re.search(r"timeout -s INT -k 15 \d+ ", bench)
    # placeholder logs, packed
    logs = {"gpu_env.txt", "build.log", "tests.log", "memcheck.log", "racecheck.log", "memcheck-triton.log",
            "profile.log", "bench.log", "summary.txt"}
    assert logs <= members(out / "gpu-results.tar.gz")
    assert "gpu-results.tar.gz" not in members(out / "gpu-results.tar.gz")
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("== ") and [line.split(":")[0] for line in lines[1:]] == [
        "stage build+tests", "stage sanitize", "stage profile", "stage bench", "stage pack"]


def test_dry_run_selected_stages_relative_out_from_another_directory(tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    r = run(["--dry-run", "--stage", "pack,bench-quick", "--stage=build", "rel/out"], cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    status, order = summary(r.stdout)
    assert order == ["build", "bench-quick", "pack"]  # always in the script's order
    assert status == {"build": "dry-run", "bench-quick": "dry-run", "pack": "ok"}
    out = cwd / "rel" / "out"
    assert (out / "gpu-results.tar.gz").is_file()
    packed = members(out / "gpu-results.tar.gz")
    assert {"build.log", "bench-quick.log", "gpu_env.txt", "summary.txt"} <= packed
    assert not {"tests.log", "memcheck.log", "bench.log"} & packed
    bench = next(line for line in r.stdout.splitlines() if " -m ddpm_fast bench" in line)
    assert " --quick " in bench and " --only " not in bench
    assert " -m pytest " not in r.stdout
    r = run(["--dry-run", "--stage", "build+tests", "marked"], cwd=cwd, TEST_MARKERS="cuda or triton")
    assert r.returncode == 0, r.stdout + r.stderr
    pytest_cmd = next(line for line in r.stdout.splitlines() if " -m pytest " in line)
    assert re.search(r" -m cuda\\ or\\ triton ", pytest_cmd)
    r = run(["--dry-run", "--stage", "bench", "split"], cwd=cwd, BENCH_ONLY="e2e,train")
    assert r.returncode == 0, r.stdout + r.stderr
    bench = next(line for line in r.stdout.splitlines() if " -m ddpm_fast bench" in line)
    assert re.search(r" --only e2e\\?,train ", bench)  # printf %q may escape the comma
    r = run(["--dry-run", "--stage", "profile", "cases"], cwd=cwd, PROFILE_CASES="attention-cuda-bf16-64x1x256x256")
    assert r.returncode == 0, r.stdout + r.stderr
    ncu = next(line for line in r.stdout.splitlines() if "profile_kernels.py" in line)
    assert re.search(r" --cases attention-cuda-bf16-64x1x256x256 ", ncu)


def test_pack_only_packs_what_is_there_and_not_its_own_tarball(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench-cuda.json").write_text("{}")
    (out / "gpu-results.tar.gz").write_bytes(b"an old tarball")
    r = run(["--dry-run", "--stage", "pack", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    status, _ = summary(r.stdout)
    assert status == {"pack": "ok"}
    assert members(out / "gpu-results.tar.gz") == {"bench-cuda.json", "gpu_env.txt", "summary.txt"}


def test_a_real_pack_leaves_the_tarball_and_the_summary(tmp_path):
    """A device call brings back 8 files of OUT: a real (not dry) pack leaves two, and loses nothing."""
    out = tmp_path / "out"
    (out / "profile").mkdir(parents=True)
    for name in ("tests.log", "tests.xml", "memcheck.log", "racecheck.log", "profile/ncu-summary.md"):
        (out / name).write_text(name)
    r = run(["--stage", "pack", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.tar.gz", "summary.txt"]
    assert {"tests.log", "tests.xml", "memcheck.log", "racecheck.log", "profile/ncu-summary.md", "gpu_env.txt",
            "summary.txt"} <= members(out / "gpu-results.tar.gz")


def fake_gpu_tools(tmp_path, memcheck_errors=0):
    """A compute-sanitizer that runs its command and prints a clean (or not) summary, and a PYTHON
    whose CUDA check passes and whose cuda_smoke.py prints its last line: the sanitize stage's real
    path (no --dry-run) on a machine without a GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text(f"""#!/usr/bin/env bash
tool=$2; shift 2
echo "========= COMPUTE-SANITIZER"
"$@"; rc=$?
if [ "$tool" = memcheck ]; then
  for _ in $(seq {memcheck_errors}); do echo "========= Invalid __global__ read of size 4 bytes"; done
  echo "========= ERROR SUMMARY: {memcheck_errors} errors"
else
  echo "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
fi
exit $rc
""")
    python = bin_dir / "python"
    python.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *cuda_status*) echo "BUILD_INFO: fake"; exit 0 ;;
  *cuda_smoke.py*) echo "$3 smoke: all ok"; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    for f in (sanitizer, python):
        f.chmod(0o755)
    return dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(python))


@pytest.mark.parametrize("budget, errors, status, notes", [
    (600, 0, "ok", ["memcheck cuda ok", "racecheck cuda ok", "memcheck triton ok"]),
    # with under two minutes left after the CUDA runs, the optional Triton one is left out with a note
    (130, 0, "ok", ["memcheck cuda ok", "racecheck cuda ok", "memcheck triton not run"]),
    (600, 2, "FAIL", ["memcheck cuda FAIL", "2 memory error(s)", "racecheck cuda ok", "memcheck triton FAIL"]),
])
def test_sanitize_judges_each_run_by_its_log(tmp_path, budget, errors, status, notes):
    r = run(["--stage", "sanitize", "out"], cwd=tmp_path, BUDGET_S=str(budget), **fake_gpu_tools(tmp_path, errors))
    got, _ = summary(r.stdout)
    assert got == {"sanitize": status}, r.stdout + r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("stage sanitize:"))
    for note in notes:
        assert note in line, line
    assert "--backend triton" in (tmp_path / "out" / "memcheck-triton.log").read_text() or "not run" in line
