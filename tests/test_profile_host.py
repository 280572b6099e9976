"""benchmarks/profile_host.py: the host/GPU split of the bench cases.  On a CPU, the plumbing (rows,
files, errors, an interrupted run); on a GPU, that it counts the launches the CUDA GroupNorm's paths
make and times them."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs, requires_cuda

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_host  # noqa: E402


def test_cpu_rows_are_host_bound_with_no_gpu_figures(tmp_path):
    out = tmp_path / "out"
    assert profile_host.main([str(out), "--suites", "group_norm", "--impl", "^eager", "--calls", "3",
                              "--device", "cpu"]) == 0
    found = json.loads((out / "host-summary.json").read_text())["rows"]
    assert [r["size"] for r in found] == ["1x128ch@32x32", "1x256ch@8x8", "64x128ch@32x32", "64x256ch@8x8"]
    for r in found:
        assert r["status"] == "ok" and r["impl"] == "eager GN+SiLU" and r["bound"] == "host"
        assert r["gpu_us"] is None and r["launches"] is None and r["calls"] == 3
        assert 0 < r["host_us"] <= r["back_to_back_us"]
    md = (out / "host-summary.md").read_text()
    assert "| op | size | impl | dtype | host us | GPU us |" in md and md.count("| group_norm |") == 4


def test_a_failing_case_is_a_row_and_the_exit_status(tmp_path, monkeypatch):
    def broken(fn, device, calls):
        raise RuntimeError("no kernel image\nsecond line")

    monkeypatch.setattr(profile_host, "split", broken)
    assert profile_host.main([str(tmp_path), "--suites", "group_norm", "--impl", "^eager", "--device", "cpu"]) == 1
    found = json.loads((tmp_path / "host-summary.json").read_text())["rows"]
    assert {r["status"] for r in found} == {"failed: RuntimeError: no kernel image"}


def test_an_interrupted_run_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    done = []

    def split(fn, device, calls):
        if done:
            raise KeyboardInterrupt
        done.append(1)
        return dict(host_us=1.0, gpu_us=None, launches=None, back_to_back_us=1.0, bound="host", calls=calls, top=[])

    monkeypatch.setattr(profile_host, "split", split)
    assert profile_host.main([str(tmp_path), "--suites", "group_norm", "--impl", "^eager", "--device", "cpu"]) == 130
    assert [r["size"] for r in json.loads((tmp_path / "host-summary.json").read_text())["rows"]] == ["1x128ch@32x32"]


@pytest.mark.parametrize("args, message", [
    (["--suites", "nope"], "--suites: unknown suite 'nope'"),
    (["--suites", ","], "--suites: name at least one suite"),
    (["--calls", "0"], "--calls: expected a positive int, got 0"),
    (["--impl", "("], "--impl: not a regular expression"),
])
def test_bad_arguments_name_the_option(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        profile_host.main([str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@requires_cuda
@needs("cuda")
@pytest.mark.cuda
@pytest.mark.parametrize("batch, launches", [(64, 1), (1, 2)], ids=["on-chip", "split"])
def test_cuda_group_norm_launches_and_device_time(batch, launches):
    """On-chip at batch 64 is one launch; batch 1 takes the split path, gn_stats then gn_norm."""
    import ddpm_fast as df

    x = torch.randn(batch, 128, 32, 32, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(2, 128, device="cuda").unbind(0)  # float32 and contiguous: no conversion launches
    r = profile_host.split(lambda: df.group_norm(x, 32, w, b, 1e-6, silu=True, backend="cuda"), x.device, calls=10)
    assert r["launches"] == launches
    assert r["gpu_us"] > 0 and r["host_us"] > 0 and r["bound"] in ("host", "GPU")
    names = [name for name, _ in r["top"]]
    assert all(name.startswith("gn_") for name in names) and len(names) == launches


def test_no_device_events_is_a_failure_not_a_zero(monkeypatch):
    """Where CUPTI cannot trace, a CUDA case must fail, not read as 0 us of GPU time."""
    monkeypatch.setattr(profile_host, "device_events", lambda prof: [])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with pytest.raises(RuntimeError, match="no device events"):
        profile_host.split(lambda: None, torch.device("cuda"), calls=2)
