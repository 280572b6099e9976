"""Argument checks shared by the public ops and the reference.

Every failure is a ValueError or TypeError that names the argument and says what was
expected; kernels are only ever launched on arguments that passed these checks.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Optional, Tuple, Union

import torch

from .schedule import DeviceTables, NoiseSchedule, as_schedule

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
FORMS = ("posterior", "eps")


def tensor(x, name: str, *, ndim_min: int = 0) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32, float16, bfloat16 or float64 tensor, got {x.dtype}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimensions, got shape {tuple(x.shape)}")
    return x


def same_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, other in others.items():
        if isinstance(other, torch.Tensor) and other.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} like {ref_name}, got one on {other.device}")


def choice(value, name: str, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return value


def positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def schedule(s: Union[NoiseSchedule, DeviceTables]) -> NoiseSchedule:
    return as_schedule(s)


def timesteps(t, batch: int, T: int, device: torch.device) -> torch.Tensor:
    """t (int or integer tensor [B] / scalar) -> LongTensor [B] on ``device``, values checked in [0, T).

    The range check reads the values on the host, except while a CUDA graph is being
    captured or torch.compile traces (no sync, no data-dependent branch allowed) or inside
    ``timesteps_checked_on_host``; the kernels clamp t so a bad value can never read out of
    bounds there.
    """
    if isinstance(t, bool):
        raise TypeError("t: expected an int or an integer tensor, got bool")
    if isinstance(t, int):
        if not 0 <= t < T:
            raise ValueError(f"t: expected a timestep in [0, {T}) for this schedule, got {t}")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"t: expected an integer tensor, got {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
        raise ValueError(f"t: expected a scalar or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t: expected a tensor on {device} like the samples, got one on {t.device}")
    on_device = torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()) \
        or (not t.is_cpu and _HOST_CHECKED.get())
    if not on_device and t.numel() and bool(((t < 0) | (t >= T)).any()):
        bad = t[(t < 0) | (t >= T)].flatten()[0].item()
        raise ValueError(f"t: expected timesteps in [0, {T}) for this schedule, got {bad}")
    return t.to(torch.int64).reshape(-1).expand(batch)


_HOST_CHECKED = contextvars.ContextVar("ddpm_fast_timesteps_checked_on_host", default=False)


@contextlib.contextmanager
def timesteps_checked_on_host():
    """Within it, timestep tensors on a GPU are not read back to check their range: the caller
    checked them on the host before copying them over, and a training step stays free of host syncs."""
    token = _HOST_CHECKED.set(True)
    try:
        yield
    finally:
        _HOST_CHECKED.reset(token)


def noise_source(noise, seed, like: torch.Tensor, shape: Tuple[int, ...]) -> None:
    if noise is not None and seed is not None:
        raise ValueError("noise, seed: pass at most one of them")
    if noise is not None:
        tensor(noise, "noise")
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise: expected shape {tuple(shape)}, got {tuple(noise.shape)}")
        same_device(like, "the samples", noise=noise)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")


def rng(value, seed, noise, sample_offset, like: torch.Tensor) -> None:
    """rng: the (seed, sample_offset) pair as an int64 [2] tensor on the samples' device, in place of
    the seed and sample_offset arguments."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"rng: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.int64 or tuple(value.shape) != (2,):
        raise ValueError(f"rng: expected an int64 tensor [2] (seed, sample_offset), got {value.dtype} "
                         f"{list(value.shape)}")
    same_device(like, "the samples", rng=value)
    if seed is not None or noise is not None or sample_offset != 0:
        raise ValueError("rng: holds the seed and the sample offset; pass neither seed, noise nor sample_offset "
                         "with it")


def per_channel(x: Optional[torch.Tensor], name: str, B: int, C: int, like: torch.Tensor) -> None:
    if x is None:
        return
    tensor(x, name)
    if tuple(x.shape) != (B, C):
        raise ValueError(f"{name}: expected shape [{B}, {C}] (per sample and channel), got {tuple(x.shape)}")
    same_device(like, "x", **{name: x})


def affine(w: Optional[torch.Tensor], name: str, C: int, like: torch.Tensor) -> None:
    if w is None:
        return
    tensor(w, name)
    if tuple(w.shape) != (C,):
        raise ValueError(f"{name}: expected shape [{C}], got {tuple(w.shape)}")
    same_device(like, "x", **{name: w})
