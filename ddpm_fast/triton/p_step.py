"""The reverse step in Triton: x_{t-1} = mean(x_t, model output, t) + sigma_t z, z drawn in registers.

Math as ddpm_fast/reference/p_step.py (and csrc/include/ddpm_fast/step.h).
Grid (tiles, B), B in launches of at most 65535 samples (launch.py): a program owns BLOCK Philox
groups (4*BLOCK elements) of one sample. Contiguous tensors load a contiguous [BLOCK, 4] tile in
NCHW order; channels_last ones a [quads of positions, channels, 4] tile in storage order, each
group's 4 values (4 positions of one channel) along its last axis (see tile(); when 4 does not
divide HW, the NCHW-order tile, gathered). Bytes: 3 * N * sizeof(T) (+N for learned_range's v, +N
for passed-in noise); ~15 FLOPs and a quarter of a Philox call per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schedule import TABLE_ROWS
from . import launch
from .philox import normal4, normal_tile


def _row(name: str) -> tl.constexpr:
    # A kernel may read a module global only as a tl.constexpr (the interpreter takes any global).
    return tl.constexpr(TABLE_ROWS.index(name))


ROW_BETAS, ROW_SQRT_ABAR = _row("betas"), _row("sqrt_alphas_cumprod")
ROW_SQRT_1M_ABAR = _row("sqrt_one_minus_alphas_cumprod")
ROW_RECIP_SQRT_ALPHA, ROW_EPS_COEF = _row("sqrt_recip_alphas"), _row("eps_coef")
ROW_C1, ROW_C2 = _row("posterior_mean_coef1"), _row("posterior_mean_coef2")
ROW_POST_VAR, ROW_POST_LOGVAR = _row("posterior_variance"), _row("posterior_log_variance_clipped")
ROW_LOG_BETAS = _row("log_betas")

BLOCK = 256  # Philox groups a program owns: 1024 elements


@triton.jit
def tile(pid, N, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program pid's Philox groups, and its tile's NCHW element indices j, offsets m in the sample's
    storage, channels c and mask.
    - BLOCK_C = 0: BLOCK groups in NCHW order, a [BLOCK, 4] tile: contiguous, or in channels_last
      (when 4 does not divide HW) gathered at hw * C + c.
    - BLOCK_C > 0, channels_last with 4 | HW: BLOCK // BLOCK_C quads of positions by BLOCK_C
      channels, a [BLOCK // BLOCK_C, BLOCK_C, 4] tile whose element (q, c, l) is position 4q + l of
      channel c.  Its 4 values along l are one Philox group (c HW / 4 + q), so one call still
      serves 4 elements, while the offsets hw * C + c run along c: loads and stores coalesce."""
    if BLOCK_C == 0:
        group = pid * BLOCK + tl.arange(0, BLOCK)
        j = 4 * group[:, None] + tl.arange(0, 4)[None, :]
        c = j // HW
        m = (j % HW) * C + c if CHANNELS_LAST else j
        mask = j < N
    else:
        QUADS: tl.constexpr = BLOCK // BLOCK_C
        tiles_c = tl.cdiv(C, BLOCK_C)
        q = (pid // tiles_c) * QUADS + tl.arange(0, QUADS)
        cc = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        group = cc[None, :] * (HW // 4) + q[:, None]
        hw = 4 * q[:, None, None] + tl.arange(0, 4)[None, None, :]
        c = cc[None, :, None]
        j = c * HW + hw
        m = hw * C + c
        mask = (hw < HW) & (c < C)
    return group, j, m, c, mask


@triton.jit
def tile_noise(seed, group, sample, t, stream, BLOCK_C: tl.constexpr):
    """The normals of a tile() tile, in its shape."""
    if BLOCK_C == 0:
        z = normal_tile(seed, group, sample, t, stream)
    else:
        n0, n1, n2, n3 = normal4(seed, group, sample, t, stream)
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (n0.shape[0], n0.shape[1], 4))
    return z


def tiling(N: int, C: int, channels_last: bool):
    """(grid axis 0, BLOCK_C) of tile() for a sample of N elements and C channels."""
    HW = N // C
    if channels_last and HW % 4 == 0:
        block_c = min(triton.next_power_of_2(C), 128)
        return triton.cdiv(HW // 4, BLOCK // block_c) * triton.cdiv(C, block_c), block_c
    return triton.cdiv(triton.cdiv(N, 4), BLOCK), 0


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
        # A NaN from the model stays NaN, as in torch.clamp: compiled tl.minimum/tl.maximum by default
        # would turn it into -clip_range (two selects instead spill in the fp16 channels_last tiles).
        x0 = tl.clamp(x0, -clip_range, clip_range, propagate_nan=tl.PropagateNan.ALL)
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
                   clip_range, first_b, PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, FORM: tl.constexpr,
                   CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_RNG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    b = first_b + tl.program_id(1)
    t = tl.minimum(tl.maximum(tl.load(t_ptr + b), 0), T - 1)
    group, j, m, c, mask = tile(tl.program_id(0), N, C, HW, CHANNELS_LAST, BLOCK, BLOCK_C)
    base = b.to(tl.int64) * N
    x = tl.load(x_ptr + base + m, mask=mask, other=0.0).to(tl.float32)
    if VARIANCE == 2:  # learned_range: out is [B, 2C, ...] in x's layout, v in the second half
        if CHANNELS_LAST:
            mo = 2 * m - c  # hw * 2C + c
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
        z = tile_noise(key, group, b + first, t, 0, BLOCK_C)
    y = step_value(x, o, v, z, t, table_ptr, T, clip_range, PREDICTION, VARIANCE, FORM, CLIP)
    tl.store(y_ptr + base + m, y.to(y_ptr.dtype.element_ty), mask=mask)



@launch.on_device
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
    tiles, block_c = tiling(N, C, channels_last)
    for first, count in launch.batch_chunks(B):
        _p_step_kernel[(tiles, count)](x_t, model_output, noise if noise is not None else x_t, y, t, table,
                                       table.shape[1], seed, sample_offset, rng if rng is not None else t, N, C,
                                       N // C, clip_range, first, PREDICTION=prediction, VARIANCE=variance, FORM=form,
                                       CLIP=bool(clip_sample), HAS_NOISE=noise is not None, HAS_RNG=rng is not None,
                                       CHANNELS_LAST=channels_last, BLOCK=BLOCK, BLOCK_C=block_c)
    return y
