"""Fake (meta) kernels for the extension's ops, so they trace under torch.compile."""

import torch


@torch.library.register_fake("ddpm_fast::philox_randn")
def _philox_randn_fake(t, sample_shape, seed, stream, sample_offset, dtype):
    return t.new_empty((t.shape[0], *sample_shape), dtype=dtype)


@torch.library.register_fake("ddpm_fast::philox4x32")
def _philox4x32_fake(counter, key):
    return torch.empty_like(counter)


def _layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("ddpm_fast::q_sample")
def _q_sample_fake(x0, t, table, noise, seed, sample_offset, rng, return_noise, channels_last):
    fmt = _layout(channels_last)
    eps = torch.empty_like(x0, memory_format=fmt) if return_noise else x0.new_empty(0)
    return torch.empty_like(x0, memory_format=fmt), eps


@torch.library.register_fake("ddpm_fast::p_step")
def _p_step_fake(x_t, model_output, t, table, noise, seed, sample_offset, rng, prediction, variance, form,
                 clip_sample, clip_range, channels_last):
    return torch.empty_like(x_t, memory_format=_layout(channels_last))


@torch.library.register_fake("ddpm_fast::picard_step")
def _picard_step_fake(x, model_output, t, table, sample, seed, prediction, variance, form, clip_sample, clip_range):
    return torch.empty_like(x), x.new_empty(t.shape, dtype=torch.float32)


@torch.library.register_fake("ddpm_fast::group_norm")
def _group_norm_fake(x, num_groups, weight, bias, eps, add, scale, shift, silu, channels_last):
    return torch.empty_like(x, memory_format=_layout(channels_last))


@torch.library.register_fake("ddpm_fast::attention")
def _attention_fake(q, k, v, scale):
    return q.new_empty(q.shape)
