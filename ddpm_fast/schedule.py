"""Noise schedules: betas -> every table the kernels index by t.

All tables are derived once in float64 on the CPU; DDPMSampler and the ops use these.
``NoiseSchedule.from_tables`` takes the tables as given instead: FastDDPMScheduler's are the
float32 numbers diffusers' DDPMScheduler computes, so that it reproduces diffusers' outputs.
``NoiseSchedule.to(device)`` returns a ``DeviceTables`` view: the same tables as one contiguous
float32 [K, T] tensor on the device, so a step reads its coefficients by t without a host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Union

import torch

# Row order of the device table; kernels index rows by these positions.
TABLE_ROWS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas",
    "eps_coef",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "log_betas",
)


def _sigmoid_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    x = torch.linspace(-6.0, 6.0, T, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so the last step has SNR 0.
    abar_sqrt = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """A DDPM noise schedule with all derived tables precomputed in float64.

    ``NoiseSchedule(betas)`` takes any 1-D sequence of betas in (0, 1].
    Timesteps are indices 0..T-1 (diffusers' convention: t = 0 is the paper's t = 1).
    """

    def __init__(self, betas: Union[torch.Tensor, Sequence[float]]):
        b = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas: expected a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b > 1).any():
            raise ValueError("betas: every beta must be finite and in (0, 1]")
        self.betas = b
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        one = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas = self.alphas.rsqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Algorithm 2's noise coefficient beta_t / sqrt(1 - abar_t).
        self.eps_coef = b / self.sqrt_one_minus_alphas_cumprod
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / one_minus
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / one_minus
        # beta~_0 is 0; the original code clips its log by reusing beta~_1 there.
        clipped = self.posterior_variance.clone()
        if clipped.numel() > 1:
            clipped[0] = clipped[1]
        self.posterior_log_variance_clipped = clipped.clamp_min(1e-20).log()
        self.log_betas = b.log()
        self._device_cache: Dict[torch.device, "DeviceTables"] = {}

    # ----------------------------------------------------------------- builders
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        _check_T(num_timesteps)
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        _check_T(num_timesteps)
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Improved DDPM's cosine schedule (diffusers' ``squaredcos_cap_v2``)."""
        _check_T(num_timesteps)
        return cls(_cosine_betas(num_timesteps, s, max_beta))

    @classmethod
    def sigmoid(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        _check_T(num_timesteps)
        return cls(_sigmoid_betas(num_timesteps, beta_start, beta_end))

    @classmethod
    def from_diffusers(cls, scheduler_or_config) -> "NoiseSchedule":
        """Build the schedule a diffusers scheduler (or its config dict) trains with."""
        cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(cfg, Mapping):
            raise TypeError("scheduler_or_config: expected a diffusers scheduler or its config mapping")
        T = int(cfg.get("num_train_timesteps", 1000))
        start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        kind = cfg.get("beta_schedule", "linear")
        trained = cfg.get("trained_betas")
        if trained is not None:
            sched = cls(trained)
        elif kind == "linear":
            sched = cls.linear(T, start, end)
        elif kind == "scaled_linear":
            sched = cls.scaled_linear(T, start, end)
        elif kind == "squaredcos_cap_v2":
            sched = cls.cosine(T)
        elif kind == "sigmoid":
            sched = cls.sigmoid(T, start, end)
        else:
            raise ValueError(f"scheduler_or_config: unsupported beta_schedule {kind!r}")
        if cfg.get("rescale_betas_zero_snr", False):
            sched = cls(_rescale_zero_terminal_snr(sched.betas).clamp_min(1e-12))
        return sched

    @classmethod
    def from_tables(cls, tables: Mapping[str, torch.Tensor]) -> "NoiseSchedule":
        """A schedule whose kernel tables are given, one per name in TABLE_ROWS, instead of derived
        in float64 from betas: for reproducing another implementation's rounding (FastDDPMScheduler
        holds the float32 numbers DDPMScheduler computes).  Only the TABLE_ROWS tables exist on it."""
        missing = [name for name in TABLE_ROWS if name not in tables]
        if missing:
            raise ValueError(f"tables: missing {', '.join(missing)}")
        self = cls.__new__(cls)
        for name in TABLE_ROWS:
            setattr(self, name, torch.as_tensor(tables[name]).detach().cpu().to(torch.float64))
        if len({getattr(self, name).shape for name in TABLE_ROWS}) != 1 or self.betas.ndim != 1:
            raise ValueError("tables: expected 1-D tables of one length")
        self._device_cache = {}
        return self

    # ------------------------------------------------------------------- access
    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.num_timesteps}, beta[0]={self.betas[0].item():.3g}, "
                f"beta[-1]={self.betas[-1].item():.3g})")

    def respace(self, timesteps: Sequence[int]) -> "NoiseSchedule":
        """A schedule over a subsequence of timesteps, betas recomputed from its abar
        (improved DDPM's respacing): beta'_k = 1 - abar[t_k] / abar[t_{k-1}]."""
        ts = sorted({int(t) for t in timesteps})
        if not ts or ts[0] < 0 or ts[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps: expected indices in [0, {self.num_timesteps}), got {list(timesteps)[:8]}")
        abar = self.alphas_cumprod[ts]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return NoiseSchedule(1.0 - abar / prev)

    def to(self, device: Union[str, torch.device]) -> "DeviceTables":
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        tables = self._device_cache.get(device)
        if tables is None:
            stacked = torch.stack([getattr(self, name) for name in TABLE_ROWS]).to(torch.float32)
            tables = DeviceTables(self, stacked.to(device).contiguous())
            self._device_cache[device] = tables
        return tables


@dataclass(frozen=True)
class DeviceTables:
    """The schedule's float32 tables on one device, one row per name in TABLE_ROWS."""

    schedule: NoiseSchedule
    table: torch.Tensor  # [len(TABLE_ROWS), T] float32

    @property
    def num_timesteps(self) -> int:
        return self.table.shape[1]

    def row(self, name: str) -> torch.Tensor:
        return self.table[TABLE_ROWS.index(name)]


def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {T!r}")


def as_schedule(schedule: Optional[Union[NoiseSchedule, DeviceTables]], name: str = "schedule") -> NoiseSchedule:
    if isinstance(schedule, DeviceTables):
        return schedule.schedule
    if isinstance(schedule, NoiseSchedule):
        return schedule
    raise TypeError(f"{name}: expected a NoiseSchedule, got {type(schedule).__name__}")
