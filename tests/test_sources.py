"""ddpm_fast/_sources.py: the digest of the extension's sources, which the build compiles into
build_info() and ddpm_fast._ext checks against the checkout (gpu_validate.sh reuses a build by it)."""

import re
from pathlib import Path

from ddpm_fast import _ext, _sources


def test_digest_follows_the_extension_sources_only(tmp_path):
    assert _sources.digest(str(tmp_path)) is None  # no checkout: nothing to compare with
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    assert _sources.digest(str(tmp_path)) is None  # csrc/ without setup.py is no checkout either
    (tmp_path / "setup.py").write_text("setup()\n")
    kernel = tmp_path / "csrc" / "cuda" / "k.cu"
    kernel.write_text("__global__ void k() {}\n")
    first = _sources.digest(str(tmp_path))
    assert re.fullmatch("[0-9a-f]{16}", first)
    assert _sources.digest(str(tmp_path)) == first
    (tmp_path / "csrc" / "tests").mkdir()
    (tmp_path / "csrc" / "tests" / "kat_test.cpp").write_text("int main() {}\n")  # CMake's, not the extension's
    assert _sources.digest(str(tmp_path)) == first
    kernel.write_text("__global__ void k() { }\n")
    assert _sources.digest(str(tmp_path)) != first
    kernel.write_text("__global__ void k() {}\n")
    assert _sources.digest(str(tmp_path)) == first
    kernel.rename(tmp_path / "csrc" / "cuda" / "k2.cu")  # same bytes, another file
    assert _sources.digest(str(tmp_path)) != first
    (tmp_path / "csrc" / "cuda" / "k2.cu").rename(kernel)
    assert _sources.digest(str(tmp_path)) == first
    (tmp_path / "setup.py").write_text("setup(name='x')\n")  # the build's flags live there
    assert _sources.digest(str(tmp_path)) != first


def test_stale_reason_names_both_digests_and_the_rebuild(monkeypatch):
    monkeypatch.setattr(_ext, "CHECKOUT_SOURCES", "cd")
    assert _ext.stale_reason({"sources": "cd"}) is None
    why = _ext.stale_reason({"sources": "ab"})
    assert "ab" in why and "cd" in why and "pip install --no-build-isolation -e ." in why
    assert "None" in _ext.stale_reason({})  # built before build_info() had a digest
    monkeypatch.setattr(_ext, "CHECKOUT_SOURCES", None)  # an installed package: nothing to compare with
    assert _ext.stale_reason({"sources": "ab"}) is None


def test_the_checkout_has_a_digest():
    assert _ext.CHECKOUT_SOURCES is not None
    assert _ext.CHECKOUT_SOURCES == _sources.digest(str(Path(__file__).resolve().parents[1]))
