"""Training a DDPM (the paper's Algorithm 1), as `ddpm-fast train` runs it.

A step: the batch and its timesteps from DataOrder (a function of the seed and the step), the
fused q_sample + MSE of ddpm_fast.losses (noise from the Philox contract, stream 1, samples
step * batch_size ...), backward, gradient clipping, Adam, and the EMA in one _foreach_lerp_.
On a GPU the forward runs under bf16 autocast in channels_last, and nothing in a step waits for
the device: the loss is read back every ``log_every`` steps only.

Every ``checkpoint_every`` steps the whole state (model, EMA, optimiser, step, torch's RNG, which
dropout draws from, and where the data order stands) replaces the previous checkpoint atomically,
so a run killed at any moment resumes from its last checkpoint and ends with the weights an
uninterrupted run ends with (bit for bit on the CPU, one process, same batch size).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Callable, Dict, Optional

import torch

from . import losses
from .data import DataOrder, batches, to_model_input
from .models import DDPMUNet
from .modules import accelerate
from .schedule import NoiseSchedule

STATE_FORMAT = "ddpm-fast/train-state-v1"
SAMPLING = dict(prediction="epsilon", variance="fixed_small", clip_sample=True)


@dataclasses.dataclass
class Recipe:
    """What a run is: a resumed run keeps all of it.  Defaults: the paper's CIFAR-10 run."""

    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000  # linear learning-rate warm-up over this many steps
    ema_decay: float = 0.9999
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 0
    flip: bool = True  # random horizontal flips

    def __post_init__(self):
        for name in ("batch_size", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip: expected a non-negative number, got {self.grad_clip!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {self.seed!r}")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside ``path``, flushed to disk, then renamed over it: a kill at
    any moment leaves either the previous file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_sampling_checkpoint(ema: DDPMUNet, schedule: NoiseSchedule, path: str, **meta) -> None:
    """The EMA weights in the file format `ddpm-fast sample --model` and DDPMUNet.load read."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        ema.save(tmp, schedule, sampling=SAMPLING, **meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state(path: str) -> Dict[str, Any]:
    """A training state written by ``train`` (ValueError naming the file when it is not one)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume: no training state at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file
        raise ValueError(f"resume: cannot read the training state {path!r} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume: {path!r} is not a ddpm-fast training state ({STATE_FORMAT})")
    return state


def train(model: DDPMUNet, data, schedule: NoiseSchedule, steps: int, recipe: Recipe = Recipe(), *,
          device: Optional[torch.device] = None, resume: Optional[Dict[str, Any]] = None,
          checkpoint: Optional[Callable[[Dict[str, Any], DDPMUNet], None]] = None, checkpoint_every: int = 1000,
          log: Optional[Callable[[str], None]] = print, log_every: int = 100, progress: bool = False,
          workers: int = 0, meta: Optional[Dict[str, Any]] = None) -> DDPMUNet:
    """Train ``model`` to step ``steps`` on ``data`` (a tensor [N, C, H, W] in [-1, 1] or an
    ImageFolder); returns the EMA of its weights (the model to sample from).

    ``resume``: a state from ``load_state`` to continue from.  ``checkpoint(state, ema)`` is called every
    ``checkpoint_every`` steps and after the last one with the state to keep and the EMA model; ``meta``
    goes into the state.  It must not draw from torch's RNG (by building a model, say): the run goes on
    from the RNG state it was given."""
    for name, v in (("steps", steps), ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if len(data) < 1:
        raise ValueError("data: expected at least one image")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    layout = torch.channels_last if on_gpu else torch.contiguous_format
    model = accelerate(model.to(device, memory_format=layout))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, fused=on_gpu or None)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        # load_state_dict takes every group setting from the saved state, fused too: a run saved on
        # the other kind of device would step with the wrong Adam (CPU fused Adam walks the moments as
        # flat memory, and the GPU's are channels_last).  So this run's setting, the moments in this
        # run's layout, and the step count where this run's Adam keeps it (fused: on the device).
        saved = resume["optimizer"]
        opt.load_state_dict({**saved, "param_groups": [{**g, "fused": on_gpu or None} for g in saved["param_groups"]]})
        for p in params:
            st = opt.state[p]
            st.update({k: torch.empty_like(p).copy_(v) for k, v in st.items() if k != "step"})
            if "step" in st:
                st["step"] = st["step"].to(device if on_gpu else "cpu", torch.float32)
        start = int(resume["step"])
        torch.set_rng_state(resume["rng"]["cpu"])
        if on_gpu and resume["rng"].get("cuda"):
            torch.cuda.set_rng_state(resume["rng"]["cuda"][0], device)
    order = DataOrder(len(data), recipe.batch_size, recipe.seed, schedule.num_timesteps, recipe.flip)
    tables = schedule.to(device)

    def state(step: int) -> Dict[str, Any]:
        cpu = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {"format": STATE_FORMAT, "config": model.config, "betas": schedule.betas.clone(),
                "recipe": dataclasses.asdict(recipe), "step": step, "model": cpu,
                "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()}, "optimizer": opt.state_dict(),
                "rng": {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(device)] if on_gpu else []},
                "data_order": order.state(step), "meta": dict(meta or {})}

    bar = None
    if progress and start < steps:
        try:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True)
        except ImportError:  # no bar without tqdm: the log lines instead
            pass
    model.train()
    running, since, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    try:
        for step, (images, t) in enumerate(batches(data, order, start, steps, workers, pin_memory=on_gpu), start):
            x0 = to_model_input(images, device).contiguous(memory_format=layout)
            for g in opt.param_groups:
                g["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                loss = losses.eps_mse(model, x0, t, tables, recipe.seed, sample_offset=step * recipe.batch_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip, foreach=True)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - recipe.ema_decay)
            running += loss.detach()
            since += 1
            done = step + 1
            if bar is not None:
                bar.update(1)
            if done % log_every == 0 or done == steps:
                mean = running.item() / since  # the one host sync, every log_every steps
                if bar is not None:
                    bar.set_postfix(loss=f"{mean:.4f}")
                elif log:
                    log(f"step {done}/{steps}  loss {mean:.4f}  {time.perf_counter() - t0:.0f}s")
                running.zero_()
                since = 0
            if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
                checkpoint(state(done), ema)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return ema
