"""Shared test helpers.  Without a GPU, Triton kernels run under the interpreter: the
variable must be set before any Triton kernel module is imported."""

import os

# The poison fixture turns on deterministic algorithms, under which a CUDA matmul raises unless
# cuBLAS has a fixed workspace; cuBLAS reads this when it first starts, so before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ddpm_fast as df  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative-error bounds against a float64 reference for elementwise ops (docs/architecture.md, Testing).
ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def rounding_bound(ref: torch.Tensor, dtype: torch.dtype, slack: float = 1.0) -> torch.Tensor:
    """How far one rounding of float32 values to dtype may move them, elementwise, times slack: an
    ulp of |ref|, and never less than the subnormal spacing (float16 normals below 6.1e-5 are
    subnormal, where the relative error of a rounding is larger than eps)."""
    if dtype == torch.float32:
        return torch.zeros_like(ref, dtype=torch.float32)
    f = torch.finfo(dtype)
    return slack * (f.eps * ref.abs().float()).clamp_min(f.smallest_normal * f.eps)


def normal_bound(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far a backend's contract normals may sit from the reference's, elementwise, the same for
    every backend: 8 float32 ulps of max(|z|, 1) for the transcendentals (libm, libdevice and
    compiled Triton's sqrt.approx differ by an ulp or two, which scales with |z|), plus one
    rounding of a half-precision output, which may go the other way near a rounding boundary."""
    return 8 * torch.finfo(torch.float32).eps * ref.abs().float().clamp_min(1.0) + rounding_bound(ref, dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, on the CPU: a GPU kernel's output is often held to a CPU reference."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def backend_ready(name: str) -> bool:
    return df.available_backends()[name] is True


def needs(name: str):
    """Skip marker for a backend that is not usable here; the reason names what is missing."""
    return pytest.mark.skipif(not backend_ready(name), reason=f"{name}: {df.available_backends()[name]}")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    """On a GPU machine the tests marked `cuda` or `triton` run first (the sort is stable): a device
    call that runs out of time then loses CPU-only tests, which CI runs anyway, not the GPU's."""
    if torch.cuda.is_available():
        items.sort(key=lambda item: item.get_closest_marker("cuda") is None and item.get_closest_marker("triton") is None)


@pytest.fixture
def gen():
    """A freshly seeded generator per test run: inputs differ between runs, never zeros."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


KERNEL_BACKENDS = [
    pytest.param("cpu", marks=needs("cpu")),
    pytest.param("triton", marks=[needs("triton"), pytest.mark.triton]),
    pytest.param("cuda", marks=[needs("cuda"), pytest.mark.cuda]),
]


def backend_device(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


@pytest.fixture
def full_fp32():
    """cuDNN and cuBLAS in full fp32.  TF32 rounds a convolution's inputs to 10 bits, so two runs whose
    samples differ by an ulp can differ by 1e-3 after one U-Net call: the model's rounding, not the kernels'.
    (Not monkeypatch: torch's cuBLAS flags live behind __getattr__, which monkeypatch cannot restore.)"""
    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, cublas.allow_tf32
    cudnn.allow_tf32 = cublas.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, cublas.allow_tf32 = before


@pytest.fixture
def poison():
    """Uninitialised tensors come back NaN-filled (torch's deterministic mode), so an element a
    kernel forgets to write fails the comparison."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in one of the layouts the ops take: contiguous, channels_last, or a non-contiguous view."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous
    return x.contiguous()


def gn_with_outlier(x: torch.Tensor, G: int, place: str, value: float) -> torch.Tensor:
    """A copy of x with `value` in every group at one of the three values its GroupNorm pivot is
    chosen from (csrc/include/ddpm_fast/group_norm.h): channel 0 at position 0 ("first"), Cg / 2 at
    HW / 2 ("middle") or Cg - 1 at HW - 1 ("last")."""
    cg, hw = x.shape[1] // G, x[0, 0].numel()
    k, q = {"first": (0, 0), "middle": (cg // 2, hw // 2), "last": (cg - 1, hw - 1)}[place]
    x = x.clone()
    x.view(x.shape[0], G, cg, hw)[:, :, k, q] = value
    return x


def store_slack(backend: str, dtype: torch.dtype) -> float:
    """How many times the rounding error of an output store to allow.  Triton's CPU interpreter
    converts float32 to bfloat16 by truncation (seen on triton 3.6 and 3.8), where GPUs round to
    nearest even: up to twice the rounding error, so bf16 bounds double there and only there."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return 2.0 if interpreted and dtype == torch.bfloat16 else 1.0


def flash_rule(eager_err: float, dtype: torch.dtype, slack: float = 1.0) -> float:
    """The bound on a kernel's error against the float64 reference: 1e-5 in float32; in 16-bit dtypes
    flash attention's rule, twice the error of eager PyTorch in the same dtype (`eager_err`), or one
    output rounding where eager is exact, times `slack` (store_slack)."""
    if dtype == torch.float32:
        return 1e-5
    return slack * max(2 * eager_err, torch.finfo(dtype).eps / 2)


# Tensors of more than 2^31 elements, past what an int32 offset reaches: GPU tests only (4 GiB a bfloat16
# tensor), for the kernels that run there.
GPU_KERNEL_BACKENDS = [
    pytest.param("triton", marks=[requires_cuda, needs("triton"), pytest.mark.triton]),
    pytest.param("cuda", marks=[requires_cuda, needs("cuda"), pytest.mark.cuda]),
]


def batch_past_int32(sample_numel: int, tail: int = 4) -> int:
    """A batch of samples of `sample_numel` elements whose last `tail` samples start past element 2^31."""
    return 2**31 // sample_numel + 1 + tail


@pytest.fixture
def past_int32(gen):
    """A CUDA generator seeded from gen, for inputs of over 2^31 elements made on the GPU.  One such test
    runs at a time, across pytest-xdist's workers too (a file lock): eight at once could hold over 100 GB.
    Afterwards the caching allocator returns their memory, which it would otherwise keep for the worker."""
    import fcntl
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "ddpm-fast-past-int32.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        g = torch.Generator("cuda")
        g.manual_seed(int(torch.randint(2**62, (), generator=gen)))
        try:
            yield g
        finally:
            torch.cuda.empty_cache()
