"""Shared test helpers.  Without a GPU, Triton kernels run under the interpreter: the
variable must be set before any Triton kernel module is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ddpm_fast as df  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative-error bounds against a float64 reference for elementwise ops (DESIGN.md §3).
ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def backend_ready(name: str) -> bool:
    return df.available_backends()[name] is True


def needs(name: str):
    """Skip marker for a backend that is not usable here; the reason names what is missing."""
    return pytest.mark.skipif(not backend_ready(name), reason=f"{name}: {df.available_backends()[name]}")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def gen():
    """A freshly seeded generator per test run: inputs differ between runs, never zeros."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g
