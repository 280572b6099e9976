import pytest
import torch

import ddpm_fast as df
from conftest import rel_err

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_diffusers_add_noise(dtype, gen):
    sched = diffusers.DDPMScheduler()
    if dtype == torch.float64:
        sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), 0)
    schedule = df.NoiseSchedule(sched.betas) if dtype == torch.float64 else df.NoiseSchedule.from_diffusers(sched)
    x0 = torch.randn(5, 3, 7, 9, generator=gen, dtype=dtype)
    eps = torch.randn(5, 3, 7, 9, generator=gen, dtype=dtype)
    t = torch.tensor([0, 1, 499, 998, 999])
    ours = df.reference.q_sample(x0, t, schedule, noise=eps)
    theirs = sched.add_noise(x0, eps, t)
    assert ours.dtype == dtype
    assert rel_err(ours, theirs) < (1e-12 if dtype == torch.float64 else 1e-6)


def test_return_noise_is_the_contract_noise(gen):
    s = df.NoiseSchedule.cosine(100)
    x0 = torch.randn(3, 2, 5, 5, generator=gen)
    t = torch.tensor([0, 50, 99])
    x_t, eps = df.q_sample(x0, t, s, seed=11, sample_offset=2, return_noise=True)
    z = df.philox_randn(x0.shape, 11, t=t, stream=1, sample_offset=2)
    assert torch.equal(eps, z)
    assert rel_err(x_t, df.reference.q_sample(x0.double(), t, s, noise=z.double())) < 1e-6


def test_scalar_t_equals_vector_t(gen):
    s = df.NoiseSchedule.linear(1000)
    x0 = torch.randn(4, 3, 2, 2, generator=gen)
    a = df.q_sample(x0, 7, s, seed=1)
    b = df.q_sample(x0, torch.full((4,), 7), s, seed=1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(x0=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x0"),
    (dict(t=1000), ValueError, "t: "),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, "t: "),
    (dict(noise=torch.randn(2, 3, 4, 5)), ValueError, "noise"),
    (dict(schedule=None), TypeError, "schedule"),
])
def test_bad_input(kw, exc, match):
    args = dict(x0=torch.randn(2, 3, 4, 4), t=3, schedule=df.NoiseSchedule.linear(1000))
    args.update(kw)
    with pytest.raises(exc, match=match):
        df.q_sample(**args)


# ----------------------------------------------------------------- fused kernels
from conftest import (GPU_KERNEL_BACKENDS, KERNEL_BACKENDS, backend_device, batch_past_int32, flash_rule,  # noqa: E402
                      layout, normal_bound, requires_cuda, rounding_bound, store_slack)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
# "tiles": see tests/test_p_step.py.
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 5, 3, 7), (2, 130, 4, 6)], ids=["b1-vec", "odd", "tiles"])
@pytest.mark.parametrize("return_noise", [False, True])
def test_kernel_matches_reference(backend, dtype, fmt, shape, return_noise, gen, poison):
    dev = backend_device(backend)
    s = df.NoiseSchedule.cosine(1000)
    x0 = layout(torch.randn(shape, generator=gen).to(dev, dtype), fmt)
    x_in = x0.clone()
    t = torch.randint(0, 1000, (shape[0],), generator=gen).to(dev)
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    res = df.q_sample(x0, t, s, seed=seed, sample_offset=5, return_noise=return_noise, backend=backend)
    assert torch.equal(x0, x_in)
    x_t, eps = res if return_noise else (res, None)
    z = df.philox_randn(shape, seed, t=t, stream=1, sample_offset=5, backend=backend)
    ref = df.reference.q_sample(x0.double(), t, s, noise=z.double())
    eager = df.reference.q_sample(x0, t, s, noise=z.to(dtype))
    assert x_t.dtype == dtype and x_t.shape == x0.shape
    bound = flash_rule(rel_err(eager, ref), dtype, store_slack(backend, dtype))
    assert rel_err(x_t, ref) <= bound
    if return_noise:  # eps is exactly the contract noise, rounded once to the output dtype
        assert ((eps.float() - z).abs() <= rounding_bound(z, dtype, store_slack(backend, dtype))).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 5, 5), (1, 3, 2, 3), (2, 5, 1, 2), (2, 33, 3, 3), (1, 2, 31, 33),
                                   (3, 4, 1, 1)], ids=["c1-odd", "hw6", "hw2", "c33", "blocks", "hw1"])
def test_kernel_channels_last_tiles(backend, shape, gen, poison):
    """channels_last tiles (see test_p_step.CL_SHAPES): x_t to the float64 truth, eps bit for bit."""
    dev = backend_device(backend)
    s = df.NoiseSchedule.cosine(1000)
    x0 = layout(torch.randn(shape, generator=gen).to(dev), "channels_last")
    t = torch.randint(0, 1000, (shape[0],), generator=gen).to(dev)
    x_t, eps = df.q_sample(x0, t, s, seed=21, sample_offset=2, return_noise=True, backend=backend)
    z = df.philox_randn(shape, 21, t=t, stream=1, sample_offset=2, backend=backend)
    assert x_t.is_contiguous(memory_format=torch.channels_last) and torch.equal(eps, z)
    assert rel_err(x_t, df.reference.q_sample(x0.double(), t, s, noise=z.double())) < 1e-5


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cuda_more_samples_than_grid_rows(fmt, gen, poison):
    """B > 65535: the kernels' sample loop (blockIdx.y strides by gridDim.y)."""
    s = df.NoiseSchedule.linear(1000)
    x0 = layout(torch.randn(70000, 2, 1, 2, generator=gen).to("cuda"), fmt)
    t = torch.randint(0, 1000, (70000,), generator=gen).to("cuda")
    x_t, eps = df.q_sample(x0, t, s, seed=4, sample_offset=1, return_noise=True, backend="cuda")
    z = df.philox_randn(x0.shape, 4, t=t, stream=1, sample_offset=1, backend="cuda")
    assert torch.equal(eps, z)
    assert rel_err(x_t, df.reference.q_sample(x0.double(), t, s, noise=z.double())) < 1e-5


@pytest.mark.parametrize("backend", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gpu_offsets_past_int32(backend, fmt, gen, past_int32, poison):
    """Over 2^31 bfloat16 elements (4 GiB): every output element written, and the last four samples, which
    start past what an int32 offset reaches, the values the op gives for them alone and the float64
    reference's."""
    B = batch_past_int32(3 * 64 * 64)
    s = df.NoiseSchedule.cosine(1000)
    x0 = layout(torch.randn(B, 3, 64, 64, generator=past_int32, device="cuda", dtype=torch.bfloat16), fmt)
    t = torch.randint(0, 1000, (B,), generator=past_int32, device="cuda")
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    x_t = df.q_sample(x0, t, s, seed=seed, backend=backend)
    assert x_t.numel() > 2**31 and bool(torch.isfinite(x_t).all())
    tail = slice(B - 4, B)
    assert torch.equal(x_t[tail], df.q_sample(x0[tail], t[tail], s, seed=seed, sample_offset=B - 4, backend=backend))
    z = df.philox_randn(x0[tail].shape, seed, t=t[tail], stream=1, sample_offset=B - 4, backend=backend)
    ref = df.reference.q_sample(x0[tail].double(), t[tail], s, noise=z.double())
    eager = df.reference.q_sample(x0[tail], t[tail], s, noise=z.to(torch.bfloat16))
    assert rel_err(x_t[tail], ref) <= flash_rule(rel_err(eager, ref), torch.bfloat16)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_kernel_passed_noise_and_batch_invariance(backend, fmt, gen, poison):
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    x0, eps = (layout(torch.randn(6, 3, 5, 5, generator=gen).to(dev), fmt) for _ in range(2))
    t = torch.randint(0, 1000, (6,), generator=gen).to(dev)
    y = df.q_sample(x0, t, s, noise=eps, backend=backend)
    assert rel_err(y, df.reference.q_sample(x0.double(), t, s, noise=eps.double())) < 1e-6
    whole = df.q_sample(x0, t, s, seed=8, backend=backend)
    parts = torch.cat([df.q_sample(x0[:2], t[:2], s, seed=8, backend=backend),
                       df.q_sample(x0[2:], t[2:], s, seed=8, sample_offset=2, backend=backend)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("noise", ["seed", "passed"])
def test_kernel_one_value_per_sample(backend, noise, gen, poison):
    """x0 [B], which the reference takes: the kernels run it as [B, 1], whose contract draws are the
    same."""
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    x0, z = (torch.randn(5, generator=gen).to(dev) for _ in range(2))
    t = torch.randint(0, 1000, (5,), generator=gen).to(dev)
    kw = dict(seed=7) if noise == "seed" else dict(noise=z)
    x_t, eps = df.q_sample(x0, t, s, return_noise=True, backend=backend, **kw)
    _, ref_eps = df.reference.q_sample(x0.cpu(), t.cpu(), s, return_noise=True,
                                       **(kw if noise == "seed" else dict(noise=z.cpu())))
    assert x_t.shape == eps.shape == (5,) and x_t.device == x0.device
    assert ((eps.cpu() - ref_eps).abs() <= normal_bound(ref_eps, torch.float32)).all()
    assert rel_err(x_t, df.reference.q_sample(x0.double(), t, s, noise=eps.double())) < 1e-6
    assert torch.equal(df.q_sample(x0, t, s, backend=backend, **kw), x_t)


ALL_BACKENDS = ["reference", *KERNEL_BACKENDS]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_rng_tensor_is_the_seed_and_offset(backend, fmt, gen, poison):
    """rng = (seed, sample_offset) on the device draws exactly what the int arguments draw; the
    values are read when the kernel runs (what lets the sampler replay one CUDA graph per batch)."""
    dev = backend_device(backend) if backend != "reference" else "cpu"
    s = df.NoiseSchedule.linear(1000)
    x0 = layout(torch.randn(3, 3, 5, 7, generator=gen).to(dev), fmt)
    t = torch.randint(0, 1000, (3,), generator=gen).to(dev)
    seed = 2**63 + int(torch.randint(0, 2**62, (), generator=gen))  # the int64 sign bit set
    rng = df.rng_tensor(seed, 11, dev)
    want = df.q_sample(x0, t, s, seed=seed, sample_offset=11, return_noise=True, backend=backend)
    got = df.q_sample(x0, t, s, rng=rng, return_noise=True, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rng[1].fill_(12)  # in place, as the sampler updates it
    assert torch.equal(df.q_sample(x0, t, s, rng=rng, backend=backend),
                       df.q_sample(x0, t, s, seed=seed, sample_offset=12, backend=backend))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(rng=torch.tensor([1, 2, 3])), ValueError, r"rng: expected an int64 tensor \[2\]"),
    (dict(rng=torch.tensor([1.0, 2.0])), ValueError, "rng: expected an int64"),
    (dict(rng=torch.tensor([1, 2]), seed=3), ValueError, "pass neither seed"),
    (dict(rng=torch.tensor([1, 2]), sample_offset=3), ValueError, "pass neither seed"),
    (dict(rng=[1, 2]), TypeError, "rng"),
])
def test_rng_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        df.q_sample(torch.randn(2, 3, 4, 4), 5, df.NoiseSchedule.linear(10), **kw)
    with pytest.raises(ValueError, match="seed"):
        df.rng_tensor(2**64)


def test_extension_refuses_dtypes_it_has_no_kernel_for():
    """A direct torch.ops call with float64 raises naming the argument (it wrote nothing on CUDA)."""
    if df.available_backends()["cpu"] is not True:
        pytest.skip(f"cpu: {df.available_backends()['cpu']}")
    table = df.NoiseSchedule.linear(10).to("cpu").table
    x, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="x0: expected float32, float16 or bfloat16, got Double"):
        torch.ops.ddpm_fast.q_sample(x, t, table, None, 1, 0, None, False, False)
    with pytest.raises(RuntimeError, match="x_t: expected float32, float16 or bfloat16, got Double"):
        torch.ops.ddpm_fast.p_step(x, x, t, table, None, 1, 0, None, 0, 0, 0, True, 1.0, False)
    with pytest.raises(RuntimeError, match="x: expected float32, float16 or bfloat16, got Double"):
        torch.ops.ddpm_fast.group_norm(x, 3, None, None, 1e-5, None, None, None, False, False)
    with pytest.raises(RuntimeError, match=r"rng: expected a contiguous int64 tensor \[2\]"):
        torch.ops.ddpm_fast.q_sample(x.float(), t, table, None, 0, 0, torch.zeros(3, dtype=torch.long), False, False)


@requires_cuda
@pytest.mark.cuda
def test_cuda_ops_refuse_float64():
    table = df.NoiseSchedule.linear(10).to("cuda").table
    x, t = torch.randn(2, 3, 4, 4, dtype=torch.float64, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="x0: expected float32"):
        torch.ops.ddpm_fast.q_sample(x, t, table, None, 1, 0, None, False, False)
    with pytest.raises(RuntimeError, match="x_t: expected float32"):
        torch.ops.ddpm_fast.p_step(x, x, t, table, None, 1, 0, None, 0, 0, 0, True, 1.0, False)
