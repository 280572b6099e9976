"""benchmarks/profile_kernels.py without a GPU: ncu's CSV parsed from a hand-written one, and the
per-case runs driven through stand-ins for ncu that print that CSV or fail as ncu does on a machine
whose counters it cannot read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_kernels  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type",'
          '"Rule Description","Estimated Speedup Type","Estimated Speedup"')
GN = "void ddpm_fast::(anonymous namespace)::gn_onchip<c10::BFloat16, (int)8, true>(const T1 *, float *, Gn)"
METRICS = [  # (launch, kernel, section, metric, unit, value)
    (0, GN, "GPU Speed Of Light Throughput", "Duration", "msecond", "1.25"),
    (0, GN, "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "91.30"),
    (0, GN, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "40.02"),
    (0, GN, "Memory Workload Analysis", "Memory Throughput", "Tbyte/second", "3.05"),
    (0, GN, "Launch Statistics", "Registers Per Thread", "register/thread", "40"),
    (0, GN, "Launch Statistics", "Grid Size", "", "8,192"),
    (0, GN, "Launch Statistics", "Block Size", "", "256"),
    (0, GN, "Launch Statistics", "Dynamic Shared Memory Per Block", "Kbyte/block", "1.02"),
    (0, GN, "Launch Statistics", "Static Shared Memory Per Block", "byte/block", "128"),
    (0, GN, "Occupancy", "Theoretical Occupancy", "%", "100"),
    (0, GN, "Occupancy", "Achieved Occupancy", "%", "87.5"),
    (0, GN, "Warp State Statistics", "Warp Cycles Per Issued Instruction", "cycle", "n/a"),
    (0, GN, "Occupancy", "Block Limit Registers", "block", "6"),  # not a summary field
    (1, "_p_step_kernel", "GPU Speed Of Light Throughput", "Duration", "usecond", "1,234.50"),
    (1, "_p_step_kernel", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "88.1"),
]


def csv_text(metrics=METRICS):
    rows = [f'"{i}","77","python3","h","{k}","1","7","(256, 1, 1)","(8192, 1, 1)","0","9.0","{s}","{m}","{u}",'
            f'"{v}","","","","",""' for i, k, s, m, u, v in metrics]
    return "\n".join(["==PROF== Connected to process 77 (/usr/bin/python3.11)", "the program's own output",
                      "==PROF== Disconnected from process 77", HEADER, *rows,
                      "==WARNING== a line printed after the report"]) + "\n"


def test_parse_ncu_csv_one_dict_per_launch_in_base_units():
    gn, tri = profile_kernels.parse_ncu_csv(csv_text(), "group_norm-cuda")
    assert gn == dict(case="group_norm-cuda", id=0, kernel="gn_onchip<bf16, (int)8, true>", duration_us=1250.0,
                      dram_pct=91.3, sm_pct=40.02, dram_gbps=pytest.approx(3050.0), registers=40.0, grid=8192,
                      block=256, dyn_smem=pytest.approx(1020.0), static_smem=128.0, theoretical_occupancy_pct=100.0,
                      achieved_occupancy_pct=87.5, cycles_per_issue=None)
    assert tri == dict(case="group_norm-cuda", id=1, kernel="_p_step_kernel", duration_us=1234.5, dram_pct=88.1)
    assert profile_kernels.parse_ncu_csv("==PROF== no kernels were profiled\n", "x") == []


def test_short_kernel_names():
    short = profile_kernels.short_kernel
    assert short("void ns::p_step_contiguous<c10::Half, true>(const T *, long)") == "p_step_contiguous<fp16, true>"
    assert short("_attn_fwd") == "_attn_fwd"
    assert short(GN) == "gn_onchip<bf16, (int)8, true>"


def fake_ncu(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_profile_writes_a_csv_per_case_and_one_summary(tmp_path, capsys):
    (tmp_path / "sample.csv").write_text(csv_text())
    ncu = fake_ncu(tmp_path, "ncu", f"cat {tmp_path / 'sample.csv'}\n")
    out = tmp_path / "out"
    names = ["p_step-cuda-fp32-16x4x512x512", "attention-triton-bf16-64x1x256x256"]
    assert profile_kernels.profile(str(out), names, ncu) == 0
    assert sorted(os.listdir(out)) == sorted([f"ncu-{n}.{e}" for n in names for e in ("csv", "log")]
                                             + ["ncu-summary.json", "ncu-summary.md"])
    summary = json.loads((out / "ncu-summary.json").read_text())
    assert summary["failed"] == {} and [(r["case"], r["id"]) for r in summary["launches"]] == [
        (names[1], 0), (names[1], 1), (names[0], 0), (names[0], 1)]
    md = (out / "ncu-summary.md").read_text()
    assert f"| {names[0]} | `gn_onchip<bf16, (int)8, true>` | 1250.0 | 91.3 | 3050 | 40.0 | 87.5 / 100.0 | 40 | " \
           "8192 x 256 | 1020 + 128 |  |" in md
    assert "--clock-control none --profile-from-start off" in capsys.readouterr().out


def test_a_case_ncu_cannot_profile_is_reported_and_the_rest_go_on(tmp_path):
    ncu = fake_ncu(tmp_path, "ncu", 'echo "==ERROR== Failed to initialize the profiler: LibraryNotLoaded" >&2\n'
                                    "exit 1\n")
    out = tmp_path / "out"
    assert profile_kernels.profile(str(out), ["q_sample-cuda-fp32-16x4x512x512"], ncu) == 1
    failed = json.loads((out / "ncu-summary.json").read_text())["failed"]
    assert failed == {"q_sample-cuda-fp32-16x4x512x512":
                      "rc 1, 0 launches: ==ERROR== Failed to initialize the profiler: LibraryNotLoaded"}
    assert "| q_sample-cuda-fp32-16x4x512x512 | failed: rc 1, 0 launches: ==ERROR==" in (
        out / "ncu-summary.md").read_text()
    # --summarize rebuilds the table from the CSVs and keeps what failed
    (out / "ncu-extra.csv").write_text(csv_text(METRICS[-2:]))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_kernels.py"), "--summarize", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| extra | `_p_step_kernel` | 1234.5 | 88.1 |" in r.stdout and "failed: rc 1" in r.stdout


@pytest.mark.parametrize("args, message", [([], "out_dir: required"), (["o", "--cases", "nope"], "no case 'nope'"),
                                           (["--summarize", "/nonexistent"], "is not a directory")])
def test_bad_arguments(args, message):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_kernels.py"), *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
