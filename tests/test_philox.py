"""The noise contract: known answers, bit-equality across backends, and statistics."""

import json
import os

import pytest
import torch

import ddpm_fast as df
from conftest import needs, normal_bound, requires_cuda
from ddpm_fast.reference.philox import philox4x32_10

KAT = json.load(open(os.path.join(os.path.dirname(__file__), "data", "philox4x32_kat.json")))["vectors"]


def kat_tensors():
    c = torch.tensor([[int(h, 16) for h in v["counter"]] for v in KAT])
    k = torch.tensor([[int(h, 16) for h in v["key"]] for v in KAT])
    o = torch.tensor([[int(h, 16) for h in v["output"]] for v in KAT])
    return c, k, o


def raw_words(backend, c, k):
    if backend == "reference":
        return torch.stack(philox4x32_10(*c.T, *k.T), 1)
    if backend == "triton":
        from ddpm_fast.triton.philox import philox4x32

        dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton on a GPU, else the interpreter
        return philox4x32(c.to(dev), k.to(dev)).cpu()
    dev = "cuda" if backend == "cuda" else "cpu"
    return torch.ops.ddpm_fast.philox4x32(c.to(dev), k.to(dev)).cpu()


BACKENDS = [pytest.param("reference"),
            pytest.param("cpu", marks=needs("cpu")),
            pytest.param("triton", marks=[needs("triton"), pytest.mark.triton]),
            pytest.param("cuda", marks=[needs("cuda"), pytest.mark.cuda])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_answers(backend):
    c, k, o = kat_tensors()
    assert torch.equal(raw_words(backend, c, k), o)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_words_bit_equal_to_reference(backend, gen):
    c = torch.randint(0, 2**32, (512, 4), generator=gen)
    k = torch.randint(0, 2**32, (512, 2), generator=gen)
    assert torch.equal(raw_words(backend, c, k), raw_words("reference", c, k))


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normals_match_reference(backend, dtype, gen):
    dev = "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
    seed = int(torch.randint(0, 2**62, (), generator=gen)) * 4 + 3  # exercise the high key word
    t = torch.randint(0, 1000, (3,), generator=gen).to(dev)
    shape = (3, 3, 5, 7)  # 105 elements per sample: a partial last group of 4
    ours = df.philox_randn(shape, seed, t=t, stream=2, sample_offset=40, dtype=dtype, backend=backend)
    ref = df.philox_randn(shape, seed, t=t, stream=2, sample_offset=40, backend="reference")
    assert ours.dtype == dtype and ours.shape == shape and ours.device.type == dev
    assert ref.device.type == dev and ((ours.float() - ref).abs() <= normal_bound(ref, dtype)).all()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 4, 4), (2, 1, 1), (70000, 4), (70000, 3)],
                         ids=["vector", "partial", "many-samples-vector", "many-samples-partial"])
def test_cuda_normals_stores(dtype, shape, gen):
    """Whole groups stored as one vector (n % 4 == 0), partial ones element by element, and more
    samples than grid rows (B > 65535); float64 through the op itself (ops.py sends it to the reference)."""
    t = torch.randint(0, 1000, (shape[0],), generator=gen)
    ours = torch.ops.ddpm_fast.philox_randn(t.cuda(), list(shape[1:]), 77, 0, 5, dtype)
    ref = df.philox_randn(shape, 77, t=t, stream=0, sample_offset=5, backend="reference")
    assert ours.dtype == dtype and ours.shape == shape
    bound = normal_bound(ref, torch.float32 if dtype == torch.float64 else dtype)
    assert ((ours.float().cpu() - ref).abs() <= bound).all()


def test_normal_bound_scales_with_the_value():
    """Compiled Triton's sqrt.approx moves |z| > 4 by more than a flat 1e-6; the bound scales."""
    ref = torch.tensor([0.1, 1.0, 5.0, -5.0])
    assert normal_bound(ref, torch.float32)[2] > 1e-6 and normal_bound(ref, torch.float32)[2] < 8e-6
    assert normal_bound(ref, torch.float32)[0] == normal_bound(ref, torch.float32)[1] < 1e-6
    assert normal_bound(ref, torch.bfloat16)[2] > 5 * torch.finfo(torch.bfloat16).eps


def test_normals_statistics():
    z = df.philox_randn((64, 4096), 1234, t=torch.arange(64) % 7)
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
    # fourth moment of a normal is 3
    assert abs((z**4).mean().item() - 3) < 0.1
    # independence across samples and across steps of the same sample
    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).mean().item() / (a.std() * b.std()).item()

    bound = 5 / 4096**0.5
    assert abs(corr(z[0], z[1])) < bound
    t0 = df.philox_randn((1, 4096), 1234, t=10)[0]
    t1 = df.philox_randn((1, 4096), 1234, t=11)[0]
    s1 = df.philox_randn((1, 4096), 1234, t=10, stream=1)[0]
    assert abs(corr(t0, t1)) < bound and abs(corr(t0, s1)) < bound
    # the four lanes of one Philox call are independent of each other
    lanes = z.reshape(-1, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(corr(lanes[:, a], lanes[:, b])) < 5 / lanes.shape[0] ** 0.5


def test_batch_and_offset_invariance():
    t = torch.tensor([5, 6, 7, 8, 9, 10])
    whole = df.philox_randn((6, 3, 4, 4), 99, t=t)
    parts = torch.cat([df.philox_randn((2, 3, 4, 4), 99, t=t[:2]),
                       df.philox_randn((4, 3, 4, 4), 99, t=t[2:], sample_offset=2)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(shape=(2, -1)), ValueError, "shape"),
    (dict(shape=5), ValueError, "shape"),
    (dict(seed=-3), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(stream=-1), ValueError, "stream"),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, "t: "),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(backend="cuda", device="cpu"), df.BackendUnavailableError, "backend='cuda'"),
])
def test_bad_input(kw, exc, match):
    args = dict(shape=(2, 3), seed=1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        df.philox_randn(**args)


@needs("cuda")
@pytest.mark.cuda
def test_cuda_philox4x32_refuses_tensors_on_two_devices():
    c, k = torch.zeros(3, 4, dtype=torch.long, device="cuda"), torch.zeros(3, 2, dtype=torch.long)
    for args in ((c, k), (c.cpu(), k.cuda())):
        with pytest.raises(RuntimeError, match="counter, key: expected both on one device"):
            torch.ops.ddpm_fast.philox4x32(*args)


@requires_cuda
@pytest.mark.cuda
def test_cuda_default_backend_is_the_extension_or_triton():
    z = df.philox_randn((2, 9), 5, device="cuda")
    assert z.is_cuda
    ref = df.philox_randn((2, 9), 5, backend="reference")
    assert ((z.cpu() - ref).abs() <= normal_bound(ref, torch.float32)).all()


try:  # a kernel reads its callees from the module's globals
    import triton
    import triton.language as tl

    from ddpm_fast.triton.philox import sin_cos

    @triton.jit
    def _sin_cos_kernel(theta_ptr, sin_ptr, cos_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        s, c = sin_cos(tl.load(theta_ptr + i, mask=i < n))
        tl.store(sin_ptr + i, s, mask=i < n)
        tl.store(cos_ptr + i, c, mask=i < n)
except ImportError:  # no triton: the test below skips
    pass

@needs("triton")
@pytest.mark.triton
def test_triton_sin_cos_accuracy():
    """The Box-Muller sin/cos of the Triton kernels against float64, on a grid of the contract's
    thetas (fresh offset each run) and on the floats just below each multiple of pi/2."""
    import numpy as np
    import triton

    u = (torch.arange(2**16, dtype=torch.float64) + torch.rand(2**16, dtype=torch.float64)) / 2**16
    below = [np.float32(k * np.pi / 2) - np.arange(200, dtype=np.float32) * np.spacing(np.float32(k * np.pi / 2))
             for k in range(1, 5)]
    theta = torch.cat([(u.float() * np.float32(6.283185307179586)).clamp_max(6.2831855),
                       torch.from_numpy(np.concatenate(below))])
    on = theta.to("cuda" if torch.cuda.is_available() else "cpu")
    sin, cos = torch.full_like(on, float("nan")), torch.full_like(on, float("nan"))
    _sin_cos_kernel[(triton.cdiv(theta.numel(), 4096),)](on, sin, cos, theta.numel(), BLOCK=4096)
    for got, ref in ((sin.cpu(), torch.sin(theta.double())), (cos.cpu(), torch.cos(theta.double()))):
        err = (got.double() - ref).abs()
        ulp = torch.from_numpy(np.spacing(ref.abs().float().numpy())).double()
        assert err.max() < 1.2e-7
        assert (err / ulp)[ref.abs() > 1e-6].max() <= 2.0
        assert err[ref.abs() < 1e-6].max() < 1e-13
