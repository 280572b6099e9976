"""One reverse step x_t -> x_{t-1} of DDPM ancestral sampling.

form="posterior": x0_hat from the model output (optionally clipped or dynamically
    thresholded), then the posterior mean  c1_t * x0_hat + c2_t * x_t  (diffusers, original code).
form="eps": the paper's Algorithm 2,  (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t),
    with eps re-derived from the clipped x0_hat when clipping is on (the two forms are then the
    same mean in different arithmetic).
Noise: x_{t-1} = mean + sigma_t * z, sigma_t^2 = beta~_t (fixed_small), beta_t (fixed_large) or
    exp(frac * log beta_t + (1 - frac) * log beta~_t) with frac = (v + 1) / 2 (learned_range, the
    model output carries v in its second C channels).  No noise where t = 0.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _checks
from ..schedule import DeviceTables, NoiseSchedule
from .philox import STREAM_STEP, philox_randn
from .q_sample import coef, compute_dtype, draw_seed


def check_p_step(x_t, model_output, t, schedule, noise, seed, sample_offset, prediction, variance,
                 clip_sample, clip_range, form, thresholding, dynamic_thresholding_ratio, sample_max_value):
    _checks.tensor(x_t, "x_t", ndim_min=2)
    _checks.tensor(model_output, "model_output", ndim_min=2)
    _checks.same_device(x_t, "x_t", model_output=model_output)
    _checks.choice(prediction, "prediction", _checks.PREDICTIONS)
    _checks.choice(variance, "variance", _checks.VARIANCES)
    _checks.choice(form, "form", _checks.FORMS)
    if model_output.dtype != x_t.dtype:
        raise TypeError(f"model_output: expected dtype {x_t.dtype} like x_t, got {model_output.dtype}")
    B, C = x_t.shape[:2]
    want = (B, 2 * C, *x_t.shape[2:]) if variance == "learned_range" else tuple(x_t.shape)
    if tuple(model_output.shape) != want:
        extra = " (learned_range needs 2C channels: the prediction, then v)" if variance == "learned_range" else ""
        raise ValueError(f"model_output: expected shape {want}{extra}, got {tuple(model_output.shape)}")
    _checks.positive_float(clip_range, "clip_range")
    _checks.positive_float(sample_max_value, "sample_max_value")
    if not 0.0 < float(dynamic_thresholding_ratio) <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio: expected a number in (0, 1], got {dynamic_thresholding_ratio!r}")
    _checks.nonneg_int(sample_offset, "sample_offset")
    _checks.noise_source(noise, seed, x_t, tuple(x_t.shape))
    sched = _checks.schedule(schedule)
    t_vec = _checks.timesteps(t, B, sched.num_timesteps, x_t.device)
    return t_vec, sched


def threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding, as diffusers' DDPMScheduler._threshold_sample does it."""
    B = x0.shape[0]
    flat = x0.reshape(B, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)


def p_step_math(x_t, model_output, t_vec, sched: NoiseSchedule, noise, seed, sample_offset, prediction, variance,
                clip_sample, clip_range, form, thresholding, dynamic_thresholding_ratio, sample_max_value):
    cd = compute_dtype(x_t)
    n, C = x_t.dim(), x_t.shape[1]
    x = x_t.to(cd)
    out = model_output.to(cd)
    out, v = (out[:, :C], out[:, C:]) if variance == "learned_range" else (out, None)

    def k(name):
        return coef(getattr(sched, name), t_vec, n, cd)

    s1, s2 = k("sqrt_alphas_cumprod"), k("sqrt_one_minus_alphas_cumprod")
    if prediction == "epsilon":
        x0 = (x - s2 * out) / s1
    elif prediction == "sample":
        x0 = out
    else:
        x0 = s1 * x - s2 * out
    limited = thresholding or clip_sample
    if thresholding:
        x0 = threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    elif clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)

    if form == "posterior":
        mean = k("posterior_mean_coef1") * x0 + k("posterior_mean_coef2") * x
    else:
        eps = out if prediction == "epsilon" and not limited else (x - s1 * x0) / s2
        mean = k("sqrt_recip_alphas") * (x - k("eps_coef") * eps)

    if variance == "fixed_small":
        sigma = k("posterior_variance").sqrt()
    elif variance == "fixed_large":
        sigma = k("betas").sqrt()
    else:
        frac = (v + 1) / 2
        sigma = torch.exp(0.5 * (frac * k("log_betas") + (1 - frac) * k("posterior_log_variance_clipped")))
    sigma = sigma * (t_vec > 0).to(cd).reshape(-1, *([1] * (n - 1)))

    if noise is None:
        seed = draw_seed() if seed is None else seed
        noise = philox_randn(x_t.shape, seed, t=t_vec, stream=STREAM_STEP, sample_offset=sample_offset,
                             device=x_t.device)
    return (mean + sigma * noise.to(cd)).to(x_t.dtype)


def p_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: Union[int, torch.Tensor],
    schedule: Union[NoiseSchedule, DeviceTables],
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    prediction: str = "epsilon",
    variance: str = "fixed_small",
    clip_sample: bool = True,
    clip_range: float = 1.0,
    form: str = "posterior",
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
) -> torch.Tensor:
    """x_{t-1} from x_t and the model output at t (see the module docstring for the math)."""
    args = (noise, seed, sample_offset, prediction, variance, clip_sample, clip_range, form, thresholding,
            dynamic_thresholding_ratio, sample_max_value)
    t_vec, sched = check_p_step(x_t, model_output, t, schedule, *args)
    return p_step_math(x_t, model_output, t_vec, sched, *args)
