"""Fake (meta) kernels for the ops, so they trace under torch.compile: the extension's
(registered by register_extension_fakes once ddpm_fast._C is loaded) and the Triton group_norm
custom ops' (registered by ddpm_fast.triton.group_norm)."""

import torch

_EXTENSION_FAKES = []


def _extension_fake(name):
    def record(fn):
        _EXTENSION_FAKES.append((name, fn))
        return fn

    return record


@_extension_fake("ddpm_fast::philox_randn")
def _philox_randn_fake(t, sample_shape, seed, stream, sample_offset, dtype):
    return t.new_empty((t.shape[0], *sample_shape), dtype=dtype)


@_extension_fake("ddpm_fast::philox4x32")
def _philox4x32_fake(counter, key):
    return torch.empty_like(counter)


def _layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


@_extension_fake("ddpm_fast::q_sample")
def _q_sample_fake(x0, t, table, noise, seed, sample_offset, rng, return_noise, channels_last):
    fmt = _layout(channels_last)
    eps = torch.empty_like(x0, memory_format=fmt) if return_noise else x0.new_empty(0)
    return torch.empty_like(x0, memory_format=fmt), eps


@_extension_fake("ddpm_fast::p_step")
def _p_step_fake(x_t, model_output, t, table, noise, seed, sample_offset, rng, prediction, variance, form,
                 clip_sample, clip_range, channels_last):
    return torch.empty_like(x_t, memory_format=_layout(channels_last))


@_extension_fake("ddpm_fast::picard_step")
def _picard_step_fake(x, model_output, t, table, sample, seed, prediction, variance, form, clip_sample, clip_range):
    return torch.empty_like(x), x.new_empty(t.shape, dtype=torch.float32)


@_extension_fake("ddpm_fast::group_norm")
def group_norm_fake(x, num_groups, weight, bias, eps, add, scale, shift, silu, channels_last):
    """(y, mean, rstd) of a group_norm op (the CPU/CUDA one here, the Triton one in ddpm_fast.triton.group_norm)."""
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=_layout(channels_last)), stats, torch.empty_like(stats)


@_extension_fake("ddpm_fast::group_norm_backward")
def group_norm_backward_fake(dy, x, mean, rstd, num_groups, weight, bias, add, scale, shift, silu, channels_last):
    """(dx, sums [4, B, C] float32) of a group_norm_backward op."""
    return torch.empty_like(x, memory_format=_layout(channels_last)), x.new_empty((4, *x.shape[:2]),
                                                                                  dtype=torch.float32)



@_extension_fake("ddpm_fast::attention")
def _attention_fake(q, k, v, scale):
    return q.new_empty(q.shape)


def register_extension_fakes():
    for name, fn in _EXTENSION_FAKES:
        torch.library.register_fake(name)(fn)
