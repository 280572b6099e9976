"""The reverse step in Triton: x_{t-1} = mean(x_t, model output, t) + sigma_t z, z drawn in registers.

Math as ddpm_fast/reference/p_step.py (and csrc/include/ddpm_fast/step.h).
Grid (cdiv(ceil(N / 4), BLOCK), B): a program owns BLOCK Philox groups (4*BLOCK elements in NCHW
order) of one sample.  Contiguous tensors load a contiguous [BLOCK, 4] tile; channels_last ones
gather it (offset hw*C + c).  Bytes: 3 * N * sizeof(T) (+N for learned_range's v, +N for passed-in
noise); ~15 FLOPs and a quarter of a Philox call per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schedule import TABLE_ROWS
from .philox import normal4


def _row(name: str) -> tl.constexpr:
    # A kernel may read a module global only as a tl.constexpr (the interpreter takes any global).
    return tl.constexpr(TABLE_ROWS.index(name))


ROW_BETAS, ROW_SQRT_ABAR = _row("betas"), _row("sqrt_alphas_cumprod")
ROW_SQRT_1M_ABAR = _row("sqrt_one_minus_alphas_cumprod")
ROW_RECIP_SQRT_ALPHA, ROW_EPS_COEF = _row("sqrt_recip_alphas"), _row("eps_coef")
ROW_C1, ROW_C2 = _row("posterior_mean_coef1"), _row("posterior_mean_coef2")
ROW_POST_VAR, ROW_POST_LOGVAR = _row("posterior_variance"), _row("posterior_log_variance_clipped")
ROW_LOG_BETAS = _row("log_betas")


@triton.jit
def tile_offsets(group, N, C, HW, CHANNELS_LAST: tl.constexpr):
    """NCHW element indices j of BLOCK groups as a [BLOCK, 4] tile, their storage offsets, the mask."""
    j = 4 * group[:, None] + tl.arange(0, 4)[None, :]
    if CHANNELS_LAST:
        m = (j % HW) * C + j // HW
    else:
        m = j
    return j, m, j < N


@triton.jit
def philox_key(seed, sample_offset, rng_ptr, HAS_RNG: tl.constexpr):
    """The seed and first sample index: rng's (seed, sample_offset) in device memory when given, read
    at run time so a captured CUDA graph replays with the values of the moment."""
    # One return: Triton checks every return of a function against the others, constexpr branches too.
    if HAS_RNG:
        key, first = tl.load(rng_ptr), tl.load(rng_ptr + 1)
    else:
        key, first = seed, sample_offset
    return key, first


@triton.jit
def normal_tile(seed, group, sample, t, stream):
    n0, n1, n2, n3 = normal4(seed, group, sample, t, stream)
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (n0.shape[0], 4))


@triton.jit
def step_value(x, o, v, z, t, table_ptr, T, clip_range, PREDICTION: tl.constexpr, VARIANCE: tl.constexpr,
               FORM: tl.constexpr, CLIP: tl.constexpr):
    """x_{t-1} = mean + sigma_t z for one tile (t in [0, T)); v is read for learned_range only."""
    s1 = tl.load(table_ptr + ROW_SQRT_ABAR * T + t)
    s2 = tl.load(table_ptr + ROW_SQRT_1M_ABAR * T + t)
    if PREDICTION == 0:
        x0 = (x - s2 * o) / s1
    elif PREDICTION == 1:
        x0 = o
    else:
        x0 = s1 * x - s2 * o
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    if FORM == 0:
        mean = tl.load(table_ptr + ROW_C1 * T + t) * x0 + tl.load(table_ptr + ROW_C2 * T + t) * x
    else:
        if PREDICTION == 0 and not CLIP:
            e = o
        else:
            e = (x - s1 * x0) / s2
        mean = tl.load(table_ptr + ROW_RECIP_SQRT_ALPHA * T + t) * (x - tl.load(table_ptr + ROW_EPS_COEF * T + t) * e)

    if VARIANCE == 2:
        f = (v + 1.0) * 0.5
        lb = tl.load(table_ptr + ROW_LOG_BETAS * T + t)
        lp = tl.load(table_ptr + ROW_POST_LOGVAR * T + t)
        sigma = tl.exp(0.5 * (f * lb + (1.0 - f) * lp))
    elif VARIANCE == 1:
        sigma = tl.sqrt(tl.load(table_ptr + ROW_BETAS * T + t))
    else:
        sigma = tl.sqrt(tl.load(table_ptr + ROW_POST_VAR * T + t))
    return mean + tl.where(t > 0, sigma, 0.0) * z


@triton.jit
def _p_step_kernel(x_ptr, out_ptr, noise_ptr, y_ptr, t_ptr, table_ptr, T, seed, sample_offset, rng_ptr, N, C, HW,
                   clip_range, PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, FORM: tl.constexpr,
                   CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_RNG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                   BLOCK: tl.constexpr):
    b = tl.program_id(1)
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t = tl.minimum(tl.maximum(tl.load(t_ptr + b), 0), T - 1)
    j, m, mask = tile_offsets(group, N, C, HW, CHANNELS_LAST)
    base = b.to(tl.int64) * N
    x = tl.load(x_ptr + base + m, mask=mask, other=0.0).to(tl.float32)
    if VARIANCE == 2:  # learned_range: out is [B, 2C, ...] in x's layout, v in the second half
        if CHANNELS_LAST:
            mo = (j % HW) * 2 * C + j // HW
            mv = mo + C
        else:
            mo = j
            mv = j + N
        obase = b.to(tl.int64) * 2 * N
    else:
        mo = m
        mv = m
        obase = base
    o = tl.load(out_ptr + obase + mo, mask=mask, other=0.0).to(tl.float32)
    if VARIANCE == 2:
        v = tl.load(out_ptr + obase + mv, mask=mask, other=0.0).to(tl.float32)
    else:
        v = o
    if HAS_NOISE:
        z = tl.load(noise_ptr + base + m, mask=mask, other=0.0).to(tl.float32)
    else:
        key, first = philox_key(seed, sample_offset, rng_ptr, HAS_RNG)
        z = normal_tile(key, group, b + first, t, 0)
    y = step_value(x, o, v, z, t, table_ptr, T, clip_range, PREDICTION, VARIANCE, FORM, CLIP)
    tl.store(y_ptr + base + m, y.to(y_ptr.dtype.element_ty), mask=mask)


BLOCK = 256


def p_step(x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, table: torch.Tensor, noise, seed: int,
           sample_offset: int, rng, prediction: int, variance: int, form: int, clip_sample: bool, clip_range: float,
           channels_last: bool) -> torch.Tensor:
    """Launcher: arguments already validated and laid out by ddpm_fast.ops (same order as the C++ op)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.empty_like(x_t, memory_format=fmt)
    B = x_t.shape[0]
    N = x_t[0].numel() if B else 0
    if B == 0 or N == 0:
        return y
    C = x_t.shape[1]
    grid = (triton.cdiv(triton.cdiv(N, 4), BLOCK), B)
    _p_step_kernel[grid](x_t, model_output, noise if noise is not None else x_t, y, t, table, table.shape[1], seed,
                         sample_offset, rng if rng is not None else t, N, C, N // C, clip_range, PREDICTION=prediction,
                         VARIANCE=variance, FORM=form, CLIP=bool(clip_sample), HAS_NOISE=noise is not None,
                         HAS_RNG=rng is not None, CHANNELS_LAST=channels_last, BLOCK=BLOCK)
    return y
