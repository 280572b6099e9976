"""Forward diffusion q(x_t | x_0): x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _checks
from ..schedule import DeviceTables, NoiseSchedule
from .philox import STREAM_Q_SAMPLE, philox_randn


def check_q_sample(x0, t, schedule, noise, seed, sample_offset):
    _checks.tensor(x0, "x0", ndim_min=1)
    sched = _checks.schedule(schedule)
    _checks.nonneg_int(sample_offset, "sample_offset")
    _checks.noise_source(noise, seed, x0, tuple(x0.shape))
    t_vec = _checks.timesteps(t, x0.shape[0], sched.num_timesteps, x0.device)
    return t_vec, sched


def draw_seed() -> int:
    """A fresh 63-bit seed from torch's default CPU generator (so torch.manual_seed governs it)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def coef(table: torch.Tensor, t_vec: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """table[t] for each sample, shaped [B, 1, 1, ...] to broadcast over a sample."""
    return table.to(t_vec.device)[t_vec].to(dtype).reshape(-1, *([1] * (ndim - 1)))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def q_sample_math(x0, t_vec, sched: NoiseSchedule, noise, seed, sample_offset, return_noise):
    cd = compute_dtype(x0)
    if noise is None:
        seed = draw_seed() if seed is None else seed
        noise = philox_randn(x0.shape, seed, t=t_vec, stream=STREAM_Q_SAMPLE, sample_offset=sample_offset,
                             device=x0.device)
    a = coef(sched.sqrt_alphas_cumprod, t_vec, x0.dim(), cd)
    b = coef(sched.sqrt_one_minus_alphas_cumprod, t_vec, x0.dim(), cd)
    x_t = (a * x0.to(cd) + b * noise.to(cd)).to(x0.dtype)
    return (x_t, noise.to(x0.dtype)) if return_noise else x_t


def q_sample(
    x0: torch.Tensor,
    t: Union[int, torch.Tensor],
    schedule: Union[NoiseSchedule, DeviceTables],
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    sample_offset: int = 0,
    return_noise: bool = False,
):
    """x_t ~ q(x_t | x_0).  Noise is ``noise`` if given, else the Philox stream 1 of ``seed``
    (a fresh seed from torch's generator when ``seed`` is None).  With ``return_noise`` returns
    ``(x_t, eps)``."""
    t_vec, sched = check_q_sample(x0, t, schedule, noise, seed, sample_offset)
    return q_sample_math(x0, t_vec, sched, noise, seed, sample_offset, return_noise)
