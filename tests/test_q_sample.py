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
