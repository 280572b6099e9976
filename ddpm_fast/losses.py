"""Training losses: the DDPM objective (Ho et al. 2020, Algorithm 1) with the fused q_sample.

``eps_mse`` draws the noise inside the q_sample kernel (Philox stream 1 of the noise contract,
keyed by the seed, each sample's global index and its timestep), which writes x_t and ε in one
pass, runs the model on x_t and returns the mean squared error against ε.  Autograd flows through
the model as usual: q_sample's inputs need no gradient, so it runs a kernel; the loss is torch's
mse_loss, one pass forward and one backward.

The loss itself is not fused into a kernel: it would save writing and reading ε once, 4 bytes per
input element (12 KB per 32x32 RGB image) next to the U-Net's 12.1 GFLOP and tens of MB of
activations per image, so it cannot pay.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Union

import torch
import torch.nn.functional as F

from . import _checks, ops
from .schedule import DeviceTables, NoiseSchedule

REDUCTIONS = ("mean", "none", "sum")


def eps_mse(model: Callable[..., torch.Tensor], x0: torch.Tensor, t: Union[int, torch.Tensor],
            schedule: Union[NoiseSchedule, DeviceTables], seed: int, sample_offset: int = 0,
            reduction: str = "mean", backend: str = "auto", **model_kwargs) -> torch.Tensor:
    """E ||ε - model(x_t, t)||², x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, ε from the Philox contract.

    Sample b of the batch is the run's sample ``sample_offset + b``: a training loop passes
    ``sample_offset = step * batch_size`` so every step draws fresh noise that depends only on
    (seed, step, position in the batch), and a resumed run draws the same.  ``model`` is any
    ``model(x_t, t, **model_kwargs)`` returning ε's shape (a diffusers UNet2DModel's ``.sample``
    output is taken).  The loss is computed in float32 whatever the model's dtype (autocast).
    ``reduction``: "mean" (a scalar), "sum", or "none" (one value per sample, [B]).

    ``t`` on the CPU with ``x0`` on a GPU is range-checked on the host and copied over without
    blocking, so the step has no host sync (a GPU ``t`` is read back to check it)."""
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x_t, t), got {type(model).__name__}")
    _checks.choice(reduction, "reduction", REDUCTIONS)
    if seed is None:
        raise ValueError("seed: expected an int in [0, 2**64) (training noise must be reproducible), got None")
    host_checked = contextlib.nullcontext()
    if isinstance(t, torch.Tensor) and t.is_cpu and isinstance(x0, torch.Tensor) and not x0.is_cpu:
        _checks.tensor(x0, "x0", ndim_min=1)
        t = _checks.timesteps(t, x0.shape[0], _checks.schedule(schedule).num_timesteps, t.device)
        t = t.contiguous().pin_memory().to(x0.device, non_blocking=True) if x0.is_cuda else t.to(x0.device)
        host_checked = _checks.timesteps_checked_on_host()
    with host_checked:
        x_t, eps = ops.q_sample(x0, t, schedule, seed=seed, sample_offset=sample_offset, return_noise=True,
                                backend=backend)
    out = model(x_t, t, **model_kwargs)
    out = getattr(out, "sample", out)
    if not isinstance(out, torch.Tensor) or out.shape != eps.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: expected an output of the samples' shape {tuple(eps.shape)}, got {got}")
    loss = F.mse_loss(out.float(), eps.float(), reduction=reduction)
    return loss.flatten(1).mean(1) if reduction == "none" else loss
