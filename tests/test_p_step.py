"""reference.p_step against diffusers' DDPMScheduler.step (same noise), and its own contract."""

import itertools

import pytest
import torch

import ddpm_fast as df
from conftest import rel_err

diffusers = pytest.importorskip("diffusers")

PREDICTIONS = ["epsilon", "sample", "v_prediction"]
# diffusers' variance types that our three cover: fixed_small_log draws sqrt(beta~) * z too.
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "learned_range": "learned_range"}
LIMITS = ["none", "clip", "clip2", "threshold"]


def make_scheduler(prediction, dvariance, limit, dtype):
    sched = diffusers.DDPMScheduler(
        prediction_type=prediction, variance_type=dvariance, clip_sample=limit.startswith("clip"),
        clip_sample_range=2.0 if limit == "clip2" else 1.0, thresholding=limit == "threshold",
        sample_max_value=1.5, dynamic_thresholding_ratio=0.9)
    if dtype == torch.float64:  # run diffusers' own step code on float64 tables
        sched.betas = sched.betas.double()
        sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas, 0)
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


def step_both(sched, schedule, x, out, t_diff, t_ours, gen, variance, limit):
    noise_gen = torch.Generator().set_state(gen.get_state())
    theirs = sched.step(out, t_diff, x, generator=gen).prev_sample
    noise = torch.randn(x.shape, generator=noise_gen, dtype=x.dtype)  # what randn_tensor drew
    ours = df.reference.p_step(
        x, out, t_ours, schedule, noise=noise, prediction=sched.config.prediction_type, variance=variance,
        clip_sample=limit.startswith("clip"), clip_range=sched.config.clip_sample_range,
        thresholding=limit == "threshold", dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    return ours, theirs


@pytest.mark.parametrize("prediction,dvariance,limit",
                         list(itertools.product(PREDICTIONS, VARIANCES, LIMITS)))
def test_matches_diffusers_step_float64(prediction, dvariance, limit, gen):
    """diffusers' own step code on float64 tables and ours, sharing betas: same math to 1e-12."""
    sched = make_scheduler(prediction, dvariance, limit, torch.float64)
    schedule = df.NoiseSchedule(sched.betas)
    variance = VARIANCES[dvariance]
    C = 3
    x = torch.randn(2, C, 5, 7, generator=gen, dtype=torch.float64)
    out = torch.randn(2, 2 * C if variance == "learned_range" else C, 5, 7, generator=gen, dtype=torch.float64)
    for t in (0, 1, 2, 500, 999):
        ours, theirs = step_both(sched, schedule, x, out, t, t, gen, variance, limit)
        assert ours.dtype == torch.float64
        assert rel_err(ours, theirs) < 1e-12, t


@pytest.mark.parametrize("prediction,dvariance,limit",
                         list(itertools.product(PREDICTIONS, VARIANCES, LIMITS)))
def test_matches_diffusers_step_float32(prediction, dvariance, limit, gen):
    """In float32 both are within float32 rounding of the float64 truth; diffusers' float32 tables
    lose digits at small t (1 - abar_t / abar_{t-1} cancels), ours are rounded from float64."""
    sched = make_scheduler(prediction, dvariance, limit, torch.float32)
    schedule = df.NoiseSchedule.from_diffusers(sched)
    variance = VARIANCES[dvariance]
    C = 3
    x = torch.randn(2, C, 5, 7, generator=gen)
    out = torch.randn(2, 2 * C if variance == "learned_range" else C, 5, 7, generator=gen)
    for t in (0, 1, 2, 500, 999):
        noise = torch.randn(x.shape, generator=torch.Generator().set_state(gen.get_state()))
        ours, theirs = step_both(sched, schedule, x, out, t, t, gen, variance, limit)
        truth = df.reference.p_step(
            x.double(), out.double(), t, schedule, noise=noise.double(), prediction=prediction, variance=variance,
            clip_sample=limit.startswith("clip"), clip_range=sched.config.clip_sample_range,
            thresholding=limit == "threshold", dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
        assert ours.dtype == torch.float32
        err_ours, err_theirs = rel_err(ours, truth), rel_err(theirs, truth)
        assert err_ours < 1e-6, t
        assert err_ours <= 2 * err_theirs + 1e-7, t


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("dvariance", ["fixed_small", "learned_range"])
def test_matches_diffusers_respaced(spacing, dvariance, gen):
    sched = diffusers.DDPMScheduler(variance_type=dvariance, timestep_spacing=spacing)
    sched.set_timesteps(25)
    sched.betas = sched.betas.double()
    sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas, 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    ts = sched.timesteps.tolist()
    schedule = df.NoiseSchedule(sched.betas).respace(ts)
    index = {t: k for k, t in enumerate(sorted(ts))}
    C = 3
    x = torch.randn(1, C, 4, 4, generator=gen, dtype=torch.float64)
    for t in ts:
        out = torch.randn(1, 2 * C if dvariance == "learned_range" else C, 4, 4, generator=gen, dtype=torch.float64)
        ours, theirs = step_both(sched, schedule, x, out, t, index[t], gen, dvariance, "clip")
        if index[t] == 0 and t > 0:
            # "trailing" ends on t = 39, not 0: diffusers still adds noise there (sigma from a clamped
            # beta~ = 1e-20, which learned_range mixes into a large one); the respaced chain's last
            # step, like improved DDPM's, adds none.
            mean = df.reference.p_step(x, out, 0, schedule, noise=torch.zeros_like(x), variance=dvariance)
            assert torch.equal(ours, mean)
            continue
        assert rel_err(ours, theirs) < 1e-12, t
        x = theirs


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("limit", ["none", "clip", "threshold"])
def test_eps_form_equals_posterior_form(prediction, limit, gen):
    s = df.NoiseSchedule.linear(1000)
    x = torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
    out = torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 37, 999])
    kw = dict(seed=5, prediction=prediction, clip_sample=limit == "clip", thresholding=limit == "threshold")
    a = df.reference.p_step(x, out, t, s, form="posterior", **kw)
    b = df.reference.p_step(x, out, t, s, form="eps", **kw)
    assert rel_err(b, a) < 1e-12


def test_no_noise_at_t0_and_noise_elsewhere(gen):
    s = df.NoiseSchedule.linear(1000)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    out = torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 10])
    a = df.reference.p_step(x, out, t, s, seed=1)
    b = df.reference.p_step(x, out, t, s, seed=2)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1], b[1])


def test_seed_draws_the_contract_noise(gen):
    s = df.NoiseSchedule.linear(1000)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    out = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 4, 5, 6])
    z = df.philox_randn(x.shape, 77, t=t, stream=0, sample_offset=9, dtype=torch.float64)
    a = df.reference.p_step(x, out, t, s, seed=77, sample_offset=9)
    b = df.reference.p_step(x, out, t, s, noise=z)
    assert rel_err(a, b) < 1e-7  # the seeded path draws fp32 normals


def test_batch_invariance(gen):
    s = df.NoiseSchedule.linear(1000)
    x = torch.randn(8, 3, 5, 5, generator=gen)
    out = torch.randn(8, 3, 5, 5, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    whole = df.p_step(x, out, t, s, seed=3)
    halves = torch.cat([df.p_step(x[:4], out[:4], t[:4], s, seed=3),
                        df.p_step(x[4:], out[4:], t[4:], s, seed=3, sample_offset=4)])
    assert torch.equal(whole, halves)


def test_inputs_untouched(gen):
    s = df.NoiseSchedule.linear(1000)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    out = torch.randn(2, 6, 4, 4, generator=gen) * 3
    x0, out0 = x.clone(), out.clone()
    df.p_step(x, out, 5, s, seed=0, variance="learned_range", thresholding=True)
    assert torch.equal(x, x0) and torch.equal(out, out0)


BAD = [
    (dict(model_output=torch.randn(2, 3, 4, 5)), ValueError, "model_output"),
    (dict(model_output=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "model_output"),
    (dict(variance="learned_range"), ValueError, "2C channels"),
    (dict(x_t=torch.zeros(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x_t"),
    (dict(t=1000), ValueError, r"t: .*\[0, 1000\)"),
    (dict(t=-1), ValueError, "t: "),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, "t: "),
    (dict(t=torch.tensor([1.0, 2.0])), TypeError, "t: "),
    (dict(t=torch.tensor([5, 1000])), ValueError, "t: "),
    (dict(prediction="noise"), ValueError, "prediction"),
    (dict(variance="learned"), ValueError, "variance"),
    (dict(form="ddim"), ValueError, "form"),
    (dict(clip_range=0.0), ValueError, "clip_range"),
    (dict(noise=torch.randn(2, 3, 4)), ValueError, "noise"),
    (dict(noise=torch.randn(2, 3, 4, 4), seed=1), ValueError, "noise, seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(sample_offset=-2), ValueError, "sample_offset"),
    (dict(schedule="linear"), TypeError, "schedule"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(t=torch.tensor([1, 2], device="meta")), ValueError, "t: .*device|t: expected a tensor on"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=[f"{i}-{b[2][:12]}" for i, b in enumerate(BAD)])
def test_bad_input(kw, exc, match):
    args = dict(x_t=torch.randn(2, 3, 4, 4), model_output=torch.randn(2, 3, 4, 4), t=5,
                schedule=df.NoiseSchedule.linear(1000))
    args.update(kw)
    with pytest.raises(exc, match=match):
        df.p_step(**args)


# ----------------------------------------------------------------- fused kernels
from conftest import (GPU_KERNEL_BACKENDS, KERNEL_BACKENDS, backend_device, batch_past_int32, flash_rule,  # noqa: E402
                      layout, requires_cuda, store_slack)

OPTION_SETS = list(itertools.product(PREDICTIONS, ["fixed_small", "fixed_large", "learned_range"], [False, True],
                                     ["posterior", "eps"]))


def kernel_vs_reference(backend, dtype, shape, fmt, gen, prediction="epsilon", variance="fixed_small",
                        clip_sample=True, form="posterior", t=None, clip_range=1.0):
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    B, C = shape[:2]
    x = layout(torch.randn(shape, generator=gen).to(dev, dtype), fmt)
    oshape = (B, 2 * C, *shape[2:]) if variance == "learned_range" else shape
    out = layout((torch.randn(oshape, generator=gen) * 1.5).to(dev, dtype), fmt)
    if t is None:
        t = torch.randint(0, 1000, (B,), generator=gen)
        t[0] = 0  # always cover the no-noise step
    t = t.to(dev)
    seed = int(torch.randint(0, 2**62, (), generator=gen)) * 4 + 1
    x_in, out_in = x.clone(), out.clone()
    kw = dict(prediction=prediction, variance=variance, clip_sample=clip_sample, clip_range=clip_range, form=form)
    y = df.p_step(x, out, t, s, seed=seed, sample_offset=3, backend=backend, **kw)
    assert torch.equal(x, x_in) and torch.equal(out, out_in), "inputs modified"
    z = df.philox_randn(shape, seed, t=t, stream=0, sample_offset=3, backend=backend)
    ref = df.reference.p_step(x.double(), out.double(), t, s, noise=z.double(), **kw)
    eager = df.reference.p_step(x, out, t, s, noise=z.to(dtype), **kw)  # PyTorch in this dtype
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    if fmt == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    err = rel_err(y, ref)
    bound = flash_rule(rel_err(eager, ref), dtype, store_slack(backend, dtype))
    assert err <= bound, (err, bound)
    return y


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("prediction,variance,clip_sample,form", OPTION_SETS)
def test_kernel_every_option(backend, prediction, variance, clip_sample, form, gen, poison):
    kernel_vs_reference(backend, torch.float32, (2, 3, 5, 7), "contiguous", gen, prediction, variance, clip_sample,
                        form, clip_range=1.3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
# "tiles": in channels_last, several channel tiles (the last one partial) by several position-quad tiles
# (the last one partial) of the Triton kernel's (position, channel) tiling.
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 5, 3, 7), (2, 4, 1, 1), (2, 130, 4, 6)],
                         ids=["b1-vec", "odd", "hw1", "tiles"])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_kernel_dtypes_layouts_shapes(backend, dtype, fmt, shape, variance, gen, poison):
    kernel_vs_reference(backend, dtype, shape, fmt, gen, variance=variance, prediction="v_prediction")


# channels_last tiles: C = 1 and HW = 1 (NCHW's memory order), HW % 4 in {1, 2, 3} (Philox groups
# that straddle channels), C above a warp, and a sample of several blocks of items.
CL_SHAPES = {"c1-odd": (2, 1, 5, 5), "hw6": (1, 3, 2, 3), "c3-odd": (2, 3, 7, 9), "hw2": (2, 5, 1, 2),
             "c33": (2, 33, 3, 3), "blocks": (1, 2, 31, 33), "hw1": (3, 4, 1, 1)}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CL_SHAPES.values(), ids=CL_SHAPES.keys())
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_kernel_channels_last_tiles(backend, dtype, shape, variance, gen, poison):
    kernel_vs_reference(backend, dtype, shape, "channels_last", gen, variance=variance)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cuda_more_samples_than_grid_rows(fmt, gen, poison):
    """B > 65535: the kernels' sample loop (blockIdx.y strides by gridDim.y)."""
    kernel_vs_reference("cuda", torch.float32, (70000, 2, 1, 2), fmt, gen, variance="learned_range")


@pytest.mark.parametrize("backend", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gpu_offsets_past_int32(backend, fmt, gen, past_int32, poison):
    """Over 2^31 bfloat16 elements (4 GiB a tensor): every output element written, and the last four
    samples, which start past what an int32 offset reaches, the values the op gives for them alone and
    the float64 reference's."""
    B = batch_past_int32(3 * 64 * 64)
    s = df.NoiseSchedule.linear(1000)
    x, out = (layout(torch.randn(B, 3, 64, 64, generator=past_int32, device="cuda", dtype=torch.bfloat16), fmt)
              for _ in range(2))
    t = torch.randint(0, 1000, (B,), generator=past_int32, device="cuda")
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    y = df.p_step(x, out, t, s, seed=seed, backend=backend)
    assert y.numel() > 2**31 and bool(torch.isfinite(y).all())
    tail = slice(B - 4, B)
    xt, ot, tt = x[tail], out[tail], t[tail]
    assert torch.equal(y[tail], df.p_step(xt, ot, tt, s, seed=seed, sample_offset=B - 4, backend=backend))
    z = df.philox_randn(xt.shape, seed, t=tt, stream=0, sample_offset=B - 4, backend=backend)
    ref = df.reference.p_step(xt.double(), ot.double(), tt, s, noise=z.double())
    eager = df.reference.p_step(xt, ot, tt, s, noise=z.to(torch.bfloat16))
    assert rel_err(y[tail], ref) <= flash_rule(rel_err(eager, ref), torch.bfloat16)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_other_ranks_and_scalar_t(backend, gen, poison):
    dev = backend_device(backend)
    s = df.NoiseSchedule.cosine(50)
    x = torch.randn(3, 10, generator=gen).to(dev)  # [B, D]
    out = torch.randn(3, 10, generator=gen).to(dev)
    y = df.p_step(x, out, 7, s, seed=1, backend=backend)
    z = df.philox_randn((3, 10), 1, t=7, backend=backend, device=dev)
    assert rel_err(y, df.reference.p_step(x.double(), out.double(), 7, s, noise=z.double())) < 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_kernel_passed_noise(backend, fmt, gen, poison):
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    x, out, z = (layout(torch.randn(2, 3, 4, 5, generator=gen).to(dev), fmt) for _ in range(3))
    t = torch.tensor([0, 400], device=dev)
    y = df.p_step(x, out, t, s, noise=z, backend=backend, variance="fixed_large")
    ref = df.reference.p_step(x.double(), out.double(), t, s, noise=z.double(), variance="fixed_large")
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("fmt,variance", [("contiguous", "fixed_small"), ("channels_last", "learned_range")])
def test_rng_tensor_is_the_seed_and_offset(backend, fmt, variance, gen, poison):
    """rng = (seed, sample_offset) on the device: the same draws as the ints, read at run time."""
    dev = backend_device(backend) if backend != "reference" else "cpu"
    s = df.NoiseSchedule.linear(1000)
    C = 3
    x = layout(torch.randn(4, C, 5, 6, generator=gen).to(dev), fmt)
    out = layout(torch.randn(4, 2 * C if variance == "learned_range" else C, 5, 6, generator=gen).to(dev), fmt)
    t = torch.randint(1, 1000, (4,), generator=gen).to(dev)
    rng = df.rng_tensor(2**64 - 5, 9, dev)
    kw = dict(variance=variance, backend=backend)
    want = df.p_step(x, out, t, s, seed=2**64 - 5, sample_offset=9, **kw)
    assert torch.equal(df.p_step(x, out, t, s, rng=rng, **kw), want)
    rng[1].fill_(0)
    assert torch.equal(df.p_step(x, out, t, s, rng=rng, **kw), df.p_step(x, out, t, s, seed=2**64 - 5, **kw))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_batch_invariance(backend, gen):
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    x, out = (torch.randn(8, 3, 6, 6, generator=gen).to(dev) for _ in range(2))
    t = torch.randint(0, 1000, (8,), generator=gen).to(dev)
    whole = df.p_step(x, out, t, s, seed=3, backend=backend)
    halves = torch.cat([df.p_step(x[:4], out[:4], t[:4], s, seed=3, backend=backend),
                        df.p_step(x[4:], out[4:], t[4:], s, seed=3, sample_offset=4, backend=backend)])
    assert torch.equal(whole, halves)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_noise_statistics(backend):
    """sigma_t z recovered from the step is N(0, sigma_t^2), independent across samples and steps."""
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    B, n = 16, 1024
    x = torch.zeros(B, 1, 32, 32, device=dev)
    out = torch.zeros(B, 1, 32, 32, device=dev)
    def noise_at(t):
        tt = torch.full((B,), t, device=dev)
        y = df.p_step(x, out, tt, s, seed=11, clip_sample=False, backend=backend)
        mean = df.p_step(x, out, tt, s, noise=torch.zeros_like(x), clip_sample=False, backend=backend)
        return ((y - mean) / s.posterior_variance[t].sqrt().item()).reshape(B, n).double().cpu()
    z1, z2 = noise_at(500), noise_at(501)
    N = z1.numel()
    assert abs(z1.mean().item()) < 5 / N**0.5
    assert abs(z1.var().item() - 1) < 5 * (2 / N) ** 0.5
    c = torch.corrcoef(torch.cat([z1, z2]))  # 32 series of 1024 draws
    off = c - torch.eye(2 * B, dtype=c.dtype)
    assert off.abs().max().item() < 5 / n**0.5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_thresholding_routes_to_reference(backend, gen):
    s = df.NoiseSchedule.linear(1000)
    dev = backend_device(backend)
    x, out = (torch.randn(2, 3, 4, 4, generator=gen).to(dev) for _ in range(2))
    with pytest.raises(df.BackendUnavailableError, match="thresholding"):
        df.p_step(x, out, 5, s, seed=0, thresholding=True, backend=backend)
    y = df.p_step(x, out, 5, s, seed=0, thresholding=True)  # auto: the reference
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("form", ["posterior", "eps"])
def test_nan_from_the_model_stays_nan_under_clipping(backend, form, gen):
    """Clipping is torch.clamp's in every backend: a NaN in, a NaN out (fminf/fmaxf, or compiled
    tl.minimum/tl.maximum, would turn it into -clip_range and hide a diverged model)."""
    dev = backend_device(backend) if backend != "reference" else "cpu"
    x, out = (torch.randn(2, 3, 4, 4, generator=gen).to(dev) for _ in range(2))
    out[0, 1, 2, 3] = out[1, 2, 0, 0] = float("nan")
    y = df.p_step(x, out, torch.tensor([0, 500], device=dev), df.NoiseSchedule.linear(1000), seed=1, form=form,
                  clip_sample=True, backend=backend)
    assert torch.equal(torch.isnan(y), torch.isnan(out))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_zero_channels(backend, poison):
    dev = backend_device(backend)
    x = torch.randn(2, 0, 4, 4, device=dev)
    y = df.p_step(x, x, 5, df.NoiseSchedule.linear(10), seed=1, variance="learned_range", backend=backend)
    assert y.shape == x.shape and y.device == x.device


EXTENSION = [p for p in KERNEL_BACKENDS if p.values[0] != "triton"]


@pytest.mark.parametrize("backend", EXTENSION)
def test_op_schema_guards(backend, gen):
    """A direct torch.ops call skips ops.py's checks: the op's own raise (naming the argument) where a
    kernel would divide by zero, read table[-1] or index a broadcast t past its one element."""
    dev = backend_device(backend)
    table = df.NoiseSchedule.linear(10).to(dev).table
    x = torch.randn(2, 3, 4, 4, generator=gen).to(dev)
    t = torch.tensor([1, 2], device=dev)

    def call(x=x, out=x, t=t, table=table, variance=0):
        return torch.ops.ddpm_fast.p_step(x, out, t, table, None, 5, 0, None, 0, variance, 0, True, 1.0, False)

    with pytest.raises(RuntimeError, match=rf"table: expected the schedule's float32 \[{table.shape[0]}, T >= 1\]"):
        call(table=table[:, :0])
    with pytest.raises(RuntimeError, match="t: expected contiguous int64"):
        call(t=torch.tensor([5], device=dev).expand(2))
    with pytest.raises(RuntimeError, match="t: expected contiguous int64"):
        torch.ops.ddpm_fast.q_sample(x, torch.tensor([5], device=dev).expand(2), table, None, 5, 0, None, False, False)
    with pytest.raises(RuntimeError, match="model_output: expected 3 channels"):
        call(out=torch.randn(2, 3, 4, 5, device=dev))
    empty = torch.randn(2, 0, 4, 4, device=dev)
    assert call(x=empty, out=empty, variance=2).shape == empty.shape  # no division by C = 0


@pytest.mark.parametrize("backend", EXTENSION)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_one_channel_channels_last_learned_range(backend, dtype, gen, poison):
    """x [B, 1, H, W] is NCHW and channels_last at once, but its learned_range output [B, 2, H, W]
    in channels_last interleaves the two channels (ops.py hands the kernels C = 1 as NCHW; a direct
    call may not)."""
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    x = torch.randn(3, 1, 4, 6, generator=gen).to(dev, dtype)
    out = torch.randn(3, 2, 4, 6, generator=gen).to(dev, dtype).contiguous(memory_format=torch.channels_last)
    z = torch.randn(3, 1, 4, 6, generator=gen).to(dev, dtype)
    t = torch.tensor([0, 500, 999], device=dev)
    y = torch.ops.ddpm_fast.p_step(x, out, t, s.to(dev).table, z, 0, 0, None, 0, 2, 0, True, 1.0, True)
    ref = df.reference.p_step(x.double(), out.double(), t, s, noise=z.double(), variance="learned_range")
    bound = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert rel_err(y, ref) <= bound


def test_kernel_opcheck_and_compile():
    pytest.importorskip("ddpm_fast._C")
    if df.available_backends()["cpu"] is not True:
        pytest.skip("extension not built")
    s = df.NoiseSchedule.linear(1000)
    table = s.to("cpu").table
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)
    t = torch.tensor([0, 9])
    torch.library.opcheck(torch.ops.ddpm_fast.p_step.default,
                          (x, out, t, table, None, 5, 0, None, 0, 2, 0, True, 1.0, False))
    torch.library.opcheck(torch.ops.ddpm_fast.p_step.default,
                          (x, out, t, table, None, 0, 0, df.rng_tensor(5, 3), 0, 2, 0, True, 1.0, False))
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample.default, (x, t, table, None, 5, 0, None, True, False))
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample.default, (x, t, table, None, 0, 0, df.rng_tensor(5, 3), True,
                                                                 False))

    def step(x, out, t):
        return df.p_step(x, out, t, s, seed=5, variance="learned_range", backend="cpu")

    assert torch.equal(torch.compile(step, fullgraph=True)(x, out, t), step(x, out, t))
