"""One Picard iteration of parallel-in-time DDPM sampling over a window of steps (ParaDiGMS).

The window of image a holds its states x_0 .. x_P (x_0 converged; x_j the current guess of the
input to step t[a, j]).  With S_j = step(x_j, out_j, t_j, z(seed, sample[a], t_j)), the fused
reverse step of ddpm_fast.reference.p_step for every position at once, the new guesses are the scan

    x_0' = x_0,    x_{j+1}' = S_j + (x_j' - x_j)

which is Picard's x_{j+1}' = x_0 + sum_{m<=j} (S_m - x_m) in exact arithmetic, but is exactly S_0 at
the first position (a window of 1 is the sequential sampler bit for bit) and exactly the
sequential recursion once a window has converged.  A position with t < 0 lies past the last step:
the identity (S_j = x_j), with err 0.  Otherwise err[a, j] = sum over the image of
(x_{j+1}' - x_{j+1})^2: the squared change of the output of step j, which decides convergence.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _checks
from ..schedule import DeviceTables, NoiseSchedule
from .p_step import p_step_math
from .philox import STREAM_STEP, philox_randn_at
from .q_sample import compute_dtype


def check_picard_step(x, model_output, t, schedule, sample, seed, prediction, variance, clip_sample, clip_range,
                      form):
    _checks.tensor(x, "x", ndim_min=3)
    _checks.tensor(model_output, "model_output", ndim_min=3)
    _checks.same_device(x, "x", model_output=model_output, t=t, sample=sample)
    _checks.choice(prediction, "prediction", _checks.PREDICTIONS)
    _checks.choice(variance, "variance", _checks.VARIANCES)
    _checks.choice(form, "form", _checks.FORMS)
    _checks.positive_float(clip_range, "clip_range")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    A, P1 = x.shape[:2]
    if P1 < 2:
        raise ValueError(f"x: expected [A, P + 1, C, ...] window states with P >= 1, got shape {tuple(x.shape)}")
    P, C = P1 - 1, x.shape[2]
    if model_output.dtype != x.dtype:
        raise TypeError(f"model_output: expected dtype {x.dtype} like x, got {model_output.dtype}")
    want = (A, P, 2 * C if variance == "learned_range" else C, *x.shape[3:])
    if tuple(model_output.shape) != want:
        raise ValueError(f"model_output: expected shape {want} (the first P window positions), "
                         f"got {tuple(model_output.shape)}")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (A, P):
        raise ValueError(f"t: expected an int64 tensor of shape {(A, P)}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(sample, torch.Tensor) or sample.dtype != torch.int64 or tuple(sample.shape) != (A,):
        raise ValueError(f"sample: expected an int64 tensor of shape {(A,)} (each image's global index)")
    sched = _checks.schedule(schedule)
    # Values are read on the host except under CUDA graph capture or torch.compile (no sync allowed
    # there); the kernels clamp t and read sample as uint32, never out of bounds.
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return sched
    if t.numel() and int(t.max()) >= sched.num_timesteps:
        raise ValueError(f"t: expected timesteps below {sched.num_timesteps} (negative: past the last step)")
    if sample.numel() and int(sample.min()) < 0:
        raise ValueError("sample: expected non-negative image indices")
    return sched


def picard_step_math(x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, sched: NoiseSchedule,
                     sample: torch.Tensor, seed: int, prediction: str, variance: str, clip_sample: bool,
                     clip_range: float, form: str, noise: Optional[torch.Tensor] = None):
    """(x', err) as the module docstring defines them; noise [A, P, C, ...] overrides the contract's."""
    A, P = t.shape
    cd = compute_dtype(x)
    old = x.to(cd)
    rows = (A * P, *x.shape[2:])
    t_flat = t.reshape(-1)
    t_safe = t_flat.clamp(min=0)
    if noise is None:
        noise = philox_randn_at(rows, seed, t_safe, sample.repeat_interleave(P), STREAM_STEP, cd)
    steps = p_step_math(old[:, :P].reshape(rows), model_output.to(cd).reshape(A * P, *model_output.shape[2:]),
                        t_safe, sched, noise.reshape(rows).to(cd), None, 0, prediction, variance, clip_sample,
                        clip_range, form, False, 0.995, 1.0)
    past_end = (t_flat < 0).reshape(-1, *([1] * (x.dim() - 2)))
    steps = torch.where(past_end, old[:, :P].reshape(rows), steps).reshape(A, P, *x.shape[2:])
    new = [old[:, 0]]
    for j in range(P):
        new.append(steps[:, j] + (new[j] - old[:, j]))
    new = torch.stack(new, dim=1)
    err = (new[:, 1:] - old[:, 1:]).square().reshape(A, P, -1).sum(-1).masked_fill(t < 0, 0)
    err_dtype = torch.float64 if cd == torch.float64 else torch.float32
    return new.to(x.dtype), err.to(err_dtype)


def picard_step(x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor,
                schedule: NoiseSchedule | DeviceTables, sample: torch.Tensor, seed: int,
                prediction: str = "epsilon", variance: str = "fixed_small", clip_sample: bool = True,
                clip_range: float = 1.0, form: str = "posterior"):
    """(x', err) for window states x [A, P + 1, C, ...] (see the module docstring)."""
    args = (prediction, variance, clip_sample, clip_range, form)
    sched = check_picard_step(x, model_output, t, schedule, sample, seed, *args)
    return picard_step_math(x, model_output, t, sched, sample, seed, *args)
