"""FastDDPMScheduler: diffusers' DDPMScheduler with step and add_noise on the fused kernels.

    pipe.scheduler = FastDDPMScheduler.from_config(pipe.scheduler.config)

Same config, save/load, set_timesteps (spacing modes, custom timesteps), previous_timestep and
outputs.  The kernels read tables built from the float32 ``alphas_cumprod`` that DDPMScheduler
holds, by the same float32 operations its step makes, so with a torch.Generator (or a list of
them) a step draws exactly DDPMScheduler's noise and gives its numbers to float32 rounding.
(``NoiseSchedule``, which DDPMSampler uses, derives its tables in float64 instead: more exact, and
a few 1e-5 away from diffusers' float32 tables near both ends of the schedule.)  Without a
generator the noise is drawn inside the kernel from the Philox contract (a seed from torch's
global generator, sample i = batch row i).  step makes no host sync: the tables live on the
device and t is looked up on the host, also when set_timesteps(device=...) put the timesteps on
the GPU (a step at one of them finds its value in a host copy).

Every config DDPMScheduler accepts works.  One the kernels cannot honour (variance "learned" or
"fixed_large_log", an unknown prediction type, or a schedule whose tables are not finite, such as
beta_end > 1) runs DDPMScheduler's own code, with a warning once per scheduler.  So does the last
step of a "trailing" schedule, where diffusers still adds noise at t > 0.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from . import ops
from .reference.q_sample import draw_seed
from .schedule import TABLE_ROWS, NoiseSchedule

VARIANCE = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
            "learned_range": "learned_range"}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
# The rows the fused step reads, by variance (the posterior form; the eps form's rows may be infinite
# where diffusers never uses them, as at the last step of a zero-terminal-SNR schedule).
_MEAN_ROWS = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2")
STEP_ROWS = {"fixed_small": _MEAN_ROWS + ("posterior_variance",), "fixed_large": _MEAN_ROWS + ("betas",),
             "learned_range": _MEAN_ROWS + ("log_betas", "posterior_log_variance_clipped")}


def diffusers_tables(alphas_cumprod: torch.Tensor, timesteps: Sequence[int], variance_type: str) -> NoiseSchedule:
    """The kernel tables over ``timesteps`` (ascending; each one's previous timestep is the one
    before it, or none), computed as DDPMScheduler.step and _get_variance compute them: the same
    float32 operations in the same order on its float32 alphas_cumprod."""
    acp = alphas_cumprod.detach().cpu().to(torch.float32)
    a = acp[torch.as_tensor(list(timesteps), dtype=torch.long)]
    a_prev = torch.cat([torch.ones(1), a[:-1]])
    beta_prod, beta_prod_prev = 1 - a, 1 - a_prev
    alpha_t = a / a_prev
    beta_t = 1 - alpha_t
    variance = torch.clamp((1 - a_prev) / (1 - a) * beta_t, min=1e-20)
    if variance_type == "fixed_small_log":
        # diffusers' sigma is exp(0.5 log var); the kernel takes the sqrt of this row, and
        # sqrt(fl(s * s)) == s in binary floating point, so the kernel's sigma is diffusers' bit for bit.
        std = torch.exp(0.5 * torch.log(variance))
        variance = std * std
    tables = dict(
        betas=beta_t,
        alphas_cumprod=a,
        alphas_cumprod_prev=a_prev,
        sqrt_alphas_cumprod=a**0.5,
        sqrt_one_minus_alphas_cumprod=beta_prod**0.5,
        sqrt_recip_alphas=1 / alpha_t**0.5,
        eps_coef=beta_t / beta_prod**0.5,
        posterior_mean_coef1=(a_prev**0.5 * beta_t) / beta_prod,
        posterior_mean_coef2=alpha_t**0.5 * beta_prod_prev / beta_prod,
        posterior_variance=variance,
        posterior_log_variance_clipped=torch.log(variance),
        log_betas=torch.log(beta_t),
    )
    assert set(tables) == set(TABLE_ROWS)
    return NoiseSchedule.from_tables(tables)


def _version_of(t: torch.Tensor) -> Optional[int]:
    """t's in-place version; None for an inference tensor (made under torch.inference_mode, as
    set_timesteps is inside a pipeline so wrapped), which keeps no version."""
    return None if t.is_inference() else t._version


def _element_index(t: torch.Tensor, ts: torch.Tensor) -> Optional[int]:
    """k where the 0-dim t is the view ts[k] of the 1-D ts (same storage, dtype and device), else None."""
    if not (t.dim() == 0 and ts.dim() == 1 and ts.numel() and ts.stride(0) > 0 and t.dtype == ts.dtype
            and t.device == ts.device and t.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
        return None
    k, r = divmod(t.storage_offset() - ts.storage_offset(), ts.stride(0))
    return k if r == 0 and 0 <= k < ts.numel() else None


class FastDDPMScheduler(DDPMScheduler):
    def _fast_schedule(self):
        """(tables over the current timesteps, {t: its index} or None when unspaced), built once
        per set_timesteps: the cache key is the timesteps tensor itself, not its values, so a step
        does not walk all T timesteps in Python.  (None, None) when the kernels cannot honour
        this config."""
        spaced = bool(self.num_inference_steps or self.custom_timesteps)
        key = (spaced, id(self.timesteps), self.timesteps.data_ptr(), _version_of(self.timesteps),
               self.config.variance_type, self.config.prediction_type)
        cached = getattr(self, "_fast_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        T = self.alphas_cumprod.numel()
        host = [int(t) for t in self.timesteps.tolist()]  # one copy per set_timesteps, wherever they live
        ts = sorted(set(host)) if spaced else list(range(T))
        sched = diffusers_tables(self.alphas_cumprod, ts, self.config.variance_type)
        index = {t: k for k, t in enumerate(ts)} if spaced else None
        reason = self._unsupported(sched)
        if reason is not None:
            if not getattr(self, "_fallback_warned", False):
                warnings.warn(f"FastDDPMScheduler: {reason}; stepping with DDPMScheduler's own code", stacklevel=3)
                self._fallback_warned = True
            sched, index = None, None
        self._fast_cache = (key, sched, index, self.timesteps, host)  # holding it keeps its id unique
        return sched, index

    def _host_timestep(self, timestep: Union[int, torch.Tensor]) -> int:
        """timestep as an int, without reading the device where it need not: an element of
        self.timesteps on a GPU (what `for t in scheduler.timesteps` yields after
        set_timesteps(device=...)) is found in the host copy by its place in their storage.  The
        copy follows set_timesteps and in-place writes that move the tensor's version; a write
        around it (through .data, numpy or DLPack) to device timesteps needs set_timesteps again."""
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            k = _element_index(timestep, self.timesteps)
            if k is not None:
                return self._fast_cache[4][k]
        return int(timestep)

    def _unsupported(self, sched: NoiseSchedule) -> Optional[str]:
        cfg = self.config
        if VARIANCE.get(self.variance_type) is None:
            return f"variance_type {self.variance_type!r} has no fused kernel"
        if cfg.prediction_type not in PREDICTIONS:
            return f"prediction_type {cfg.prediction_type!r} is not one of {PREDICTIONS}"
        rows = STEP_ROWS[VARIANCE[self.variance_type]]
        bad = [name for name in rows if not torch.isfinite(getattr(sched, name)).all()]
        if bad:
            return f"this schedule's {bad[0]} is not finite (a beta outside (0, 1)?)"
        return None

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor], sample: torch.Tensor,
             generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
             return_dict: bool = True) -> Union[DDPMSchedulerOutput, tuple]:
        sched, index = self._fast_schedule()
        t = self._host_timestep(timestep)
        model_output = model_output.to(sample.dtype)
        variance = VARIANCE.get(self.variance_type)
        learned = self.variance_type in ("learned", "learned_range")
        split = learned and model_output.shape[1] == sample.shape[1] * 2
        k = None if sched is None else (t if index is None else index.get(t))
        if k is None or (k == 0 and t > 0) or (variance == "learned_range" and not split):
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
        key = (id(self.alphas_cumprod), _version_of(self.alphas_cumprod))
        cached = getattr(self, "_fast_add_noise", None)
        if cached is None or cached[0] != key:
            T = self.alphas_cumprod.numel()
            full = diffusers_tables(self.alphas_cumprod, range(T), "fixed_small")
            usable = all(torch.isfinite(getattr(full, name)).all() for name in
                         ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))
            self._fast_add_noise = cached = (key, full if usable else None, self.alphas_cumprod)
        if cached[1] is None:
            return super().add_noise(original_samples, noise, timesteps)
        t = timesteps.to(original_samples.device) if isinstance(timesteps, torch.Tensor) else timesteps
        return ops.q_sample(original_samples, t, cached[1], noise=noise.to(original_samples.dtype))
