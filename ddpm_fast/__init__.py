"""ddpm-fast: fused kernels and a fast sampler for DDPM diffusion models."""

from . import reference
from .ops import (
    BackendUnavailableError,
    attention,
    available_backends,
    group_norm,
    p_step,
    philox_randn,
    picard_step,
    q_sample,
    rng_tensor,
)
from .parallel import ParallelConfig
from .sampler import DDPMSampler, to_uint8
from .schedule import NoiseSchedule
from . import losses, models
from .modules import FusedGroupNorm, FusedGroupNormSiLU, accelerate

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DDPMSampler",
    "FusedGroupNorm",
    "FusedGroupNormSiLU",
    "NoiseSchedule",
    "ParallelConfig",
    "accelerate",
    "attention",
    "available_backends",
    "models",
    "group_norm",
    "losses",
    "p_step",
    "philox_randn",
    "picard_step",
    "q_sample",
    "reference",
    "rng_tensor",
    "to_uint8",
]
