"""Fake (meta) kernels for the extension's ops, so they trace under torch.compile."""

import torch


@torch.library.register_fake("ddpm_fast::philox_randn")
def _philox_randn_fake(t, sample_shape, seed, stream, sample_offset, dtype):
    return t.new_empty((t.shape[0], *sample_shape), dtype=dtype)


@torch.library.register_fake("ddpm_fast::philox4x32")
def _philox4x32_fake(counter, key):
    return torch.empty_like(counter)
