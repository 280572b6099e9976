"""One Picard iteration over windows of reverse steps in Triton (ddpm_fast/reference/picard.py).

    S_j = step(x[a, j], out[a, j], z(seed, sample[a], t[a, j]))   (p_step.py's step_value; t < 0: S_j = x[a, j], err 0)
    x'[a, 0] = x[a, 0],   x'[a, j+1] = S_j + (x'[a, j] - x[a, j]),   err[a, j] = sum_n (x'[a, j+1] - x[a, j+1])^2
Grid (cdiv(ceil(N / 4), BLOCK), A), A in launches of at most 65535 (launch.py): a program owns BLOCK
Philox groups (4*BLOCK elements, NCHW order) of one image and walks the P positions in order, the
carry x' - x in registers; each position's squared change is summed per program into partial[a,
program, j], which the launcher sums (the same order every run). Bytes per image: (P + 1) N reads of
x, P N (2 P N) of the model output, (P + 1) N writes: ~(3P + 2) N sizeof(T). ~20 FLOPs and a quarter
Philox call per element and position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .p_step import step_value
from .philox import normal_tile


@triton.jit
def _picard_kernel(x_ptr, out_ptr, y_ptr, partial_ptr, t_ptr, sample_ptr, table_ptr, T, seed, P, N, clip_range,
                   first_a, PREDICTION: tl.constexpr, VARIANCE: tl.constexpr, FORM: tl.constexpr, CLIP: tl.constexpr,
                   BLOCK: tl.constexpr):
    a = first_a + tl.program_id(1)
    pid = tl.program_id(0)
    group = pid * BLOCK + tl.arange(0, BLOCK)
    j = 4 * group[:, None] + tl.arange(0, 4)[None, :]
    mask = j < N
    xbase = a.to(tl.int64) * (P + 1) * N
    obase = a.to(tl.int64) * P * N * (2 if VARIANCE == 2 else 1)
    ostride = N * (2 if VARIANCE == 2 else 1)
    sample = tl.load(sample_ptr + a)
    x = tl.load(x_ptr + xbase + j, mask=mask, other=0.0)
    tl.store(y_ptr + xbase + j, x, mask=mask)
    x = x.to(tl.float32)
    carry = tl.zeros_like(x)
    for p in range(0, P):
        t_raw = tl.load(t_ptr + a * P + p)
        t = tl.minimum(tl.maximum(t_raw, 0), T - 1)
        o = tl.load(out_ptr + obase + p * ostride + j, mask=mask, other=0.0).to(tl.float32)
        if VARIANCE == 2:
            v = tl.load(out_ptr + obase + p * ostride + N + j, mask=mask, other=0.0).to(tl.float32)
        else:
            v = o
        z = normal_tile(seed, group, sample, t, 0)
        s = step_value(x, o, v, z, t, table_ptr, T, clip_range, PREDICTION, VARIANCE, FORM, CLIP)
        s = tl.where(t_raw >= 0, s, x)
        xn = tl.load(x_ptr + xbase + (p + 1) * N + j, mask=mask, other=0.0).to(tl.float32)
        new = s + carry
        d = new - xn
        sq = tl.sum(tl.sum(tl.where(mask & (t_raw >= 0), d * d, 0.0), 1), 0)
        tl.store(partial_ptr + (a * tl.num_programs(0) + pid) * P + p, sq)
        tl.store(y_ptr + xbase + (p + 1) * N + j, new.to(y_ptr.dtype.element_ty), mask=mask)
        carry = d
        x = xn


BLOCK = 256


@launch.on_device
def picard_step(x: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                sample: torch.Tensor, seed: int, prediction: int, variance: int, form: int, clip_sample: bool,
                clip_range: float):
    """Launcher: arguments already validated and laid out by ddpm_fast.ops (same order as the C++ op)."""
    A, P1 = x.shape[:2]
    P = P1 - 1
    N = x[0, 0].numel() if A else 0
    y = torch.empty_like(x)
    if A == 0 or N == 0:
        return y, torch.zeros(A, P, dtype=torch.float32, device=x.device)
    programs = triton.cdiv(triton.cdiv(N, 4), BLOCK)
    partial = torch.empty(A, programs, P, dtype=torch.float32, device=x.device)
    for first, count in launch.batch_chunks(A):
        _picard_kernel[(programs, count)](x, model_output, y, partial, t, sample, table, table.shape[1], seed, P, N,
                                          clip_range, first, PREDICTION=prediction, VARIANCE=variance, FORM=form,
                                          CLIP=bool(clip_sample), BLOCK=BLOCK)
    return y, partial.sum(1)
