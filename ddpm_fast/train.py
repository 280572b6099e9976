"""Training a DDPM (the paper's Algorithm 1) with the fused q_sample, as `ddpm-fast train` runs it.

Noise comes from the Philox contract (stream 1): step k's batch uses samples
k * batch_size .. (k + 1) * batch_size - 1 of the run's seed, so a run is reproducible.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import ops
from .models import DDPMUNet
from .schedule import NoiseSchedule


def train(model: DDPMUNet, data: torch.Tensor, schedule: NoiseSchedule, steps: int, batch_size: int = 128,
          lr: float = 5e-4, ema_decay: float = 0.999, seed: int = 0, log: Optional[Callable[[str], None]] = print,
          log_every: int = 200) -> DDPMUNet:
    """Train ``model`` on ``data`` [N, C, H, W] in [-1, 1]; returns the EMA of its weights (the model
    to sample from)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps, batch_size: expected positive ints, got {steps}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    T = schedule.num_timesteps
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        t = torch.randint(0, T, (batch_size,), generator=gen)
        x_t, eps = ops.q_sample(data[idx], t, schedule, seed=seed, sample_offset=step * batch_size, return_noise=True)
        loss = F.mse_loss(model(x_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:  # linear warm-up over the first 200 steps
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1.0 - ema_decay)
        running += loss.item()
        if log and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  {time.perf_counter() - start:.0f}s")
            running = 0.0
    model.eval()
    return ema
