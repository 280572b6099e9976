import pytest
import torch

import ddpm_fast as df

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"),
    dict(beta_schedule="linear", num_train_timesteps=50, beta_start=1e-3, beta_end=0.2),
    dict(beta_schedule="linear", rescale_betas_zero_snr=True),
]


def max_rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()


def rel(a, b):
    """||a - b|| / ||b||, the project's error measure."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def diffusers_in_float64(cfg):
    """A DDPMScheduler whose tables are rebuilt in float64 from its own betas, so its own
    _get_variance code runs without float32 cancellation (1 - abar_t / abar_{t-1} loses ~3 digits)."""
    sched = diffusers.DDPMScheduler(**cfg)
    if cfg.get("rescale_betas_zero_snr"):
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        base = dict(cfg, rescale_betas_zero_snr=False)
        sched.betas = rescale_zero_terminal_snr(df.NoiseSchedule.from_diffusers(base).betas)
    sched.betas = sched.betas.double()
    sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas, 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_schedule_matches_diffusers(cfg):
    s = df.NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(**cfg))
    ref = diffusers_in_float64(cfg)
    T = ref.config.num_train_timesteps
    assert s.num_timesteps == T
    last = T - 1 if cfg.get("rescale_betas_zero_snr") else T  # abar_{T-1} is 0 there: no relative error
    assert max_rel(s.betas, ref.betas) < 1e-6
    # diffusers' betas are float32-rounded; where beta_t is near the 0.999 cap that rounding moves
    # the tail of abar by more than 1e-6 elementwise, so tables compare by ||a - b|| / ||b||.
    assert rel(s.alphas_cumprod[:last], ref.alphas_cumprod[:last]) < 1e-6
    for kind, ours in (("fixed_small", s.posterior_variance), ("fixed_large", s.betas)):
        theirs = torch.stack([ref._get_variance(t, variance_type=kind) for t in range(1, last)])
        assert rel(ours[1:last], theirs) < 1e-6, kind


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: c["beta_schedule"])
def test_diffusers_float32_tables_within_their_rounding(cfg):
    # diffusers keeps float32 tables: its cumprod drifts from the exact abar by float32 rounding
    # accumulated over T products, far below anything sampling can see.
    sched = diffusers.DDPMScheduler(**cfg)
    s = df.NoiseSchedule.from_diffusers(sched)
    assert rel(s.alphas_cumprod, sched.alphas_cumprod) < 1e-6
    assert max_rel(s.alphas_cumprod, sched.alphas_cumprod) < 1e-4


def test_from_config_dict_equals_from_scheduler():
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    a = df.NoiseSchedule.from_diffusers(sched)
    b = df.NoiseSchedule.from_diffusers(dict(sched.config))
    assert torch.equal(a.betas, b.betas)


def test_derived_tables_are_consistent():
    s = df.NoiseSchedule.linear(1000)
    t = torch.arange(1, 1000)
    # Posterior mean with x0 recovered from eps equals Algorithm 2's mean, coefficient by coefficient.
    x, e = 0.7, -1.3
    x0 = (x - s.sqrt_one_minus_alphas_cumprod * e) / s.sqrt_alphas_cumprod
    post = s.posterior_mean_coef1 * x0 + s.posterior_mean_coef2 * x
    alg2 = s.sqrt_recip_alphas * (x - s.eps_coef * e)
    assert torch.allclose(post, alg2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(s.posterior_log_variance_clipped[t], s.posterior_variance[t].log())
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    assert s.alphas_cumprod_prev[0] == 1.0
    assert s.alphas_cumprod.dtype == torch.float64


def test_device_tables_are_float32_rows():
    s = df.NoiseSchedule.cosine(100)
    d = s.to("cpu")
    assert d.table.dtype == torch.float32 and d.table.is_contiguous()
    assert torch.allclose(d.row("sqrt_alphas_cumprod").double(), s.sqrt_alphas_cumprod, rtol=1e-7)
    assert s.to("cpu") is d  # built once per device


def test_respace_keeps_abar_subsequence():
    s = df.NoiseSchedule.linear(1000)
    ts = list(range(0, 1000, 20))
    r = s.respace(ts)
    assert r.num_timesteps == len(ts)
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[ts], rtol=1e-12)


@pytest.mark.parametrize("bad", [[], [0.0, 0.1], [0.1, 1.5], [[0.1]], [float("nan")]])
def test_bad_betas(bad):
    with pytest.raises(ValueError, match="betas"):
        df.NoiseSchedule(bad)


def test_bad_config():
    with pytest.raises(ValueError, match="beta_schedule"):
        df.NoiseSchedule.from_diffusers({"beta_schedule": "exotic"})
    with pytest.raises(TypeError, match="scheduler_or_config"):
        df.NoiseSchedule.from_diffusers(3)
    with pytest.raises(ValueError, match="num_timesteps"):
        df.NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="timesteps"):
        df.NoiseSchedule.linear(10).respace([3, 12])
