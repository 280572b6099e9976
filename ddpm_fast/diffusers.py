"""FastDDPMScheduler: diffusers' DDPMScheduler with step and add_noise on the fused kernels.

    pipe.scheduler = FastDDPMScheduler.from_config(pipe.scheduler.config)

Same config, save/load, set_timesteps (spacing modes, custom timesteps), previous_timestep and
outputs.  With a torch.Generator (or a list of them) step draws its noise exactly as
DDPMScheduler does, so the two agree to fp32 rounding; without one the noise is drawn inside the
kernel from the Philox contract (a seed from torch's global generator, sample i = batch row i).
step makes no host sync: the schedule lives on the device and t is looked up on the host.
Configurations the kernels do not cover (variance "learned" or "fixed_large_log", and the last
step of a "trailing" schedule, where diffusers still adds noise at t > 0) run DDPMScheduler's own
code.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from . import ops
from .reference.q_sample import draw_seed
from .schedule import NoiseSchedule

VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
            "learned_range": "learned_range"}


class FastDDPMScheduler(DDPMScheduler):
    def _fast_schedule(self):
        """(respaced NoiseSchedule over the current timesteps, {t: its index}), built once per
        set_timesteps: the cache key is the timesteps tensor itself, not its values, so a step
        does not walk all T timesteps in Python."""
        spaced = bool(self.num_inference_steps or self.custom_timesteps)
        key = (spaced, id(self.timesteps), self.timesteps.data_ptr(), self.timesteps._version)
        cached = getattr(self, "_fast_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        full = NoiseSchedule.from_diffusers(self.config)
        if not spaced:
            sched, index = full, None
        else:
            ts = sorted({int(t) for t in self.timesteps})
            sched, index = full.respace(ts), {t: k for k, t in enumerate(ts)}
        self._fast_cache = (key, sched, index, full, self.timesteps)  # holding it keeps its id unique
        return sched, index

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
             return_dict: bool = True) -> Union[DDPMSchedulerOutput, tuple]:
        t = int(timestep)  # timesteps live on the host in diffusers' loops: no device sync
        model_output = model_output.to(sample.dtype)
        variance = VARIANCE.get(self.variance_type)
        learned = self.variance_type in ("learned", "learned_range")
        split = learned and model_output.shape[1] == sample.shape[1] * 2
        sched, index = self._fast_schedule()
        k = t if index is None else index.get(t)
        if variance is None or k is None or (k == 0 and t > 0) or (variance == "learned_range" and not split):
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)

        eps_part = model_output[:, : sample.shape[1]] if split else model_output
        if generator is not None and k > 0:  # exactly the draw DDPMScheduler makes
            noise = randn_tensor(eps_part.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            kw = dict(noise=noise)
        elif generator is not None:  # the last step draws nothing
            kw = dict(seed=0)
        else:
            if getattr(self, "_philox_seed", None) is None:
                self._philox_seed = draw_seed()
            kw = dict(seed=self._philox_seed)
        cfg = self.config
        prev = ops.p_step(sample, model_output, k, sched, prediction=cfg.prediction_type, variance=variance,
                          clip_sample=bool(cfg.clip_sample), clip_range=float(cfg.clip_sample_range),
                          thresholding=bool(cfg.thresholding),
                          dynamic_thresholding_ratio=float(cfg.dynamic_thresholding_ratio),
                          sample_max_value=float(cfg.sample_max_value), **kw)
        x0 = self._pred_original(eps_part, sample, k, sched)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _pred_original(self, out: torch.Tensor, x: torch.Tensor, k: int, sched: NoiseSchedule) -> torch.Tensor:
        # The output class carries x0_hat; the fused step never writes it, so it is a few eager ops here.
        a = sched.sqrt_alphas_cumprod[k].item()
        s = sched.sqrt_one_minus_alphas_cumprod[k].item()
        p = self.config.prediction_type
        x0 = (x - s * out) / a if p == "epsilon" else (out if p == "sample" else a * x - s * out)
        if self.config.thresholding:
            from .reference.p_step import threshold

            return threshold(x0.float(), self.config.dynamic_thresholding_ratio,
                             self.config.sample_max_value).to(x0.dtype)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        self._fast_schedule()
        full = self._fast_cache[3]
        t = timesteps.to(original_samples.device) if isinstance(timesteps, torch.Tensor) else timesteps
        return ops.q_sample(original_samples, t, full, noise=noise.to(original_samples.dtype))
