"""q_sample in Triton: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps drawn in registers
(Philox stream 1) and written only when asked.

Grid (cdiv(ceil(N / 4), BLOCK), B), B in launches of at most 65535 samples (launch.py), tiles as
ddpm_fast/triton/p_step.py.
Bytes: 2 * N * sizeof(T) (+N for eps out, +N for passed-in noise); 3 FLOPs per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .p_step import BLOCK, ROW_SQRT_1M_ABAR, ROW_SQRT_ABAR, philox_key, tile, tile_noise, tiling


@triton.jit
def _q_sample_kernel(x_ptr, noise_ptr, y_ptr, eps_ptr, t_ptr, table_ptr, T, seed, sample_offset, rng_ptr, N, C, HW,
                     first_b, HAS_NOISE: tl.constexpr, HAS_RNG: tl.constexpr, WRITE_EPS: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    b = first_b + tl.program_id(1)
    t = tl.minimum(tl.maximum(tl.load(t_ptr + b), 0), T - 1)
    group, j, m, c, mask = tile(tl.program_id(0), N, C, HW, CHANNELS_LAST, BLOCK, BLOCK_C)
    base = b.to(tl.int64) * N
    x0 = tl.load(x_ptr + base + m, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        e = tl.load(noise_ptr + base + m, mask=mask, other=0.0).to(tl.float32)
    else:
        key, first = philox_key(seed, sample_offset, rng_ptr, HAS_RNG)
        e = tile_noise(key, group, b + first, t, 1, BLOCK_C)
    y = tl.load(table_ptr + ROW_SQRT_ABAR * T + t) * x0 + tl.load(table_ptr + ROW_SQRT_1M_ABAR * T + t) * e
    tl.store(y_ptr + base + m, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_EPS:
        tl.store(eps_ptr + base + m, e.to(eps_ptr.dtype.element_ty), mask=mask)


@launch.on_device
def q_sample(x0: torch.Tensor, t: torch.Tensor, table: torch.Tensor, noise, seed: int, sample_offset: int, rng,
             return_noise: bool, channels_last: bool):
    """Launcher: arguments already validated and laid out by ddpm_fast.ops (same order as the C++ op)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty_like(x0, memory_format=fmt)
    eps = torch.empty_like(x0, memory_format=fmt) if return_noise else x0.new_empty(0)
    B = x0.shape[0]
    N = x0[0].numel() if B else 0
    if B == 0 or N == 0:
        return y, eps
    C = x0.shape[1]
    tiles, block_c = tiling(N, C, channels_last)
    for first, count in launch.batch_chunks(B):
        _q_sample_kernel[(tiles, count)](x0, noise if noise is not None else x0, y, eps if return_noise else y, t,
                                         table, table.shape[1], seed, sample_offset, rng if rng is not None else t, N,
                                         C, N // C, first, HAS_NOISE=noise is not None, HAS_RNG=rng is not None,
                                         WRITE_EPS=return_noise, CHANNELS_LAST=channels_last, BLOCK=BLOCK,
                                         BLOCK_C=block_c)
    return y, eps
