"""The benchmark harness writes what DESIGN.md §4 asks for; no timing is asserted."""

import json
import subprocess
import sys

import pytest
import torch

from ddpm_fast.bench import harness, readme, run


def test_time_fn_and_floors():
    t = harness.time_fn(lambda: torch.ones(10).sum(), torch.device("cpu"), min_time_s=0.01)
    assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    f = harness.measure_floors(torch.device("cpu"), quick=True)
    assert f["copy_gbps"] > 0 and f["matmul_tflops"] > 0


@pytest.mark.slow
def test_bench_writes_json_markdown_png(tmp_path):
    out = run(["p_step"], quick=True, out_dir=str(tmp_path), command="test", echo=lambda *_: None)
    d = json.loads((tmp_path / "bench-cpu-quick.json").read_text())
    assert {"device_name", "torch", "triton", "cuda", "git_commit", "command", "date"} <= set(d["meta"])
    assert {"copy_gbps", "matmul_tflops"} <= set(d["floors"])
    impls = {r["impl"] for r in d["rows"]}
    assert {"reference eager", "torch.compile(reference)"} <= impls and any(i.startswith("ddpm_fast") for i in impls)
    for r in d["rows"]:
        assert {"median_ms", "bytes", "flops", "gbps", "frac_copy_floor", "tflops", "frac_matmul_floor", "vs"} <= set(r)
        assert r["median_ms"] > 0 and r["bytes"] > 0
    ours = [r for r in d["rows"] if not r["baseline"]][0]
    assert set(ours["vs"]) >= {"reference eager", "torch.compile(reference)"}
    assert (tmp_path / "bench-cpu-quick.md").read_text().count("|") > 10
    assert (tmp_path / "bench-cpu-quick.png").stat().st_size > 10_000
    assert "| p_step |" in readme.section(str(tmp_path / "bench-cpu-quick.json"))
    assert out["paths"]["json"].endswith(".json")


def test_cli_info_and_bad_bench_option():
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert info["backends"]["reference"] is True and "torch" in info
    r = subprocess.run([sys.executable, "-m", "ddpm_fast", "bench", "--only", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "--only" in r.stderr
