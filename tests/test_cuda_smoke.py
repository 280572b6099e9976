"""benchmarks/cuda_smoke.py, the script the sanitizers run on a GPU: on each backend this machine
has (on the CPU: the C++ kernels, and Triton's under the interpreter), so that a GPU run does not
find its mistakes first."""

import sys
from pathlib import Path

import pytest

from conftest import backend_device, needs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cuda_smoke  # noqa: E402


@pytest.mark.parametrize("backend", [
    pytest.param("cpu", marks=needs("cpu")),
    pytest.param("triton", marks=[needs("triton"), pytest.mark.triton, pytest.mark.slow]),
    pytest.param("cuda", marks=[needs("cuda"), pytest.mark.cuda]),
])
def test_every_check_of_the_smoke_passes(backend, capsys):
    assert cuda_smoke.main(["--backend", backend, "--device", backend_device(backend)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"{backend} smoke: all ok") and "FAIL" not in out
    checks = {"cpu": ("philox_randn", "p_step/q_sample", "group_norm fwd/bwd", "picard_step"),
              "triton": ("philox_randn", "p_step/q_sample", "group_norm fwd/bwd", "picard_step", "attention"),
              "cuda": ("philox_randn", "philox4x32", "p_step/q_sample", "group_norm fwd/bwd", "picard_step", "attention")}
    for name in checks[backend]:
        assert f"\n{name} " in "\n" + out, name


def test_an_unavailable_backend_fails(monkeypatch, capsys):
    monkeypatch.setattr(cuda_smoke.df, "available_backends", lambda: {"cuda": "no GPU here"})
    assert cuda_smoke.main(["--backend", "cuda"]) == 1
    assert "cuda backend unavailable: no GPU here" in capsys.readouterr().out
