"""benchmarks/check_build.py, against the extension this checkout built: it passes for what CI builds
(CUDA, sm_80 and sm_90, these sources, this torch) and names the first check that fails."""

import glob
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import needs
from ddpm_fast import _ext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import check_build  # noqa: E402

pytestmark = needs("cpu")


def cuobjdump():
    found = shutil.which("cuobjdump")
    try:
        import nvidia  # the nvidia-cuda-cuobjdump wheel of requirements/ci-cuda.txt and device.txt

        found = found or next(iter(glob.glob(os.path.join(nvidia.__path__[0], "*", "bin", "cuobjdump"))), None)
    except ImportError:
        pass
    if found is None:
        pytest.skip("no cuobjdump (PATH or the nvidia-cuda-cuobjdump wheel)")
    return found


def test_this_checkouts_build_passes_or_says_it_has_no_cuda(capsys):
    rc = check_build.main([])
    out = capsys.readouterr().out
    if _ext.BUILD_INFO["cuda"]:
        assert rc == 0, out
        assert "built from this checkout's sources" in out and out.rstrip().endswith("built with CUDA")
    else:
        assert rc == 1 and "FAIL: built WITHOUT CUDA" in out


@pytest.mark.skipif(not (_ext.BUILD_INFO or {}).get("cuda"), reason="the extension was built without CUDA")
def test_cubins_are_listed_and_a_missing_arch_fails(capsys):
    tool = cuobjdump()
    archs = ["sm_" + a[:-1] for a in _ext.BUILD_INFO["cuda_archs"].split(",")]  # "800,900" -> sm_80, sm_90
    assert check_build.main(["--arch", ",".join(archs), "--cuobjdump", tool]) == 0
    out = capsys.readouterr().out
    assert "cubins: " + " ".join(sorted(archs)) in out
    assert check_build.main(["--arch", "sm_75", "--cuobjdump", tool]) == 1
    assert "FAIL: no sm_75 code in the extension (cubins: " in capsys.readouterr().out


@pytest.mark.skipif(not (_ext.BUILD_INFO or {}).get("cuda"), reason="the extension was built without CUDA")
def test_stale_sources_and_another_torch_fail(monkeypatch, capsys):
    monkeypatch.setattr(_ext, "CHECKOUT_SOURCES", "0" * 16)
    assert check_build.main([]) == 1
    assert f"FAIL: ddpm_fast._C was built from other sources (digest {_ext.BUILD_INFO['sources']})" \
        in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setattr(_ext, "BUILD_INFO", dict(_ext.BUILD_INFO, torch="1.0.0"))
    assert check_build.main([]) == 1
    assert "FAIL: built for torch 1.0.0, but torch" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--arch", "sm_90"], "--arch needs --cuobjdump"),
                                           (["--arch", "90", "--cuobjdump", "x"], "expected names like sm_90")])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        check_build.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
