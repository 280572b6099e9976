"""Philox noise in Triton: the noise contract of docs/architecture.md.

normal4(seed, group, sample, t, stream) -> four N(0, 1) floats for elements
4*group .. 4*group+3 of one sample; the fused kernels call it in registers.

normal_tile: the same as a [BLOCK, 4] tile in element order.

philox_randn kernel: z[i, j] for a [B, n] output.
  grid = (cdiv(ceil(n / 4), BLOCK), B), B in launches of at most 65535 (launch.py); each program
  owns BLOCK groups of 4 elements, stored as one contiguous [BLOCK, 4] tile.
  Moves 4*B*n bytes (fp32 out), 1 Philox (10 rounds, ~80 int ops) + 2 Box-Muller per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch


@triton.jit
def sin_cos(theta):
    """sin and cos of a float32 theta in [0, 2 pi]: Cody-Waite reduction by pi/2 (pi/2 split in
    three, the first two parts short enough that k times them is exact) and the cephes sinf/cosf
    polynomials on [-pi/4, pi/4].  Measured against float64 on 2^22 thetas of the contract and the
    2000 floats below each multiple of pi/2: at most 1.5 ulps of the result (libm: 0.6), 9.3e-8
    absolute, and 1.3e-14 absolute at the zeros.  libdevice's sinf/cosf carry a Payne-Hanek path for
    |theta| > 1e5, never taken here, whose local array spilled in every kernel that drew noise."""
    k = tl.floor(theta * 0.6366197723675814 + 0.5)
    x = theta - k * 1.5703125
    x = x - k * 4.837512969970703125e-4
    x = x - k * 7.549789954891882e-8
    x2 = x * x
    s = x + x * x2 * (-1.6666654611e-1 + x2 * (8.3321608736e-3 + x2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * x2 + x2 * x2 * (4.166664568298827e-2 + x2 * (-1.388731625493765e-3 + x2 * 2.443315711809948e-5))
    q = k.to(tl.int32) & 3  # theta = q pi/2 + x
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return sin, cos


@triton.jit
def box_muller(u1, u2):
    """The contract's Box-Muller (Triton's pair_uniform_to_normal) with sin_cos."""
    u1 = tl.maximum(1.0e-7, u1)
    r = tl.sqrt(-2.0 * tl.log(u1))
    sin, cos = sin_cos(6.283185307179586 * u2)  # the constant rounds to the contract's 6.2831855f
    return r * cos, r * sin


@triton.jit
def normal4(seed, group, sample, t, stream):
    c0 = group.to(tl.uint32)
    c1 = (sample + tl.zeros_like(group)).to(tl.uint32)
    c2 = (t + tl.zeros_like(group)).to(tl.uint32)
    c3 = (stream + tl.zeros_like(group)).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, 10)
    n0, n1 = box_muller(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = box_muller(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def normal_tile(seed, group, sample, t, stream):
    """normal4 of a [BLOCK] vector of groups as a [BLOCK, 4] tile: row g holds elements 4g .. 4g + 3."""
    n0, n1, n2, n3 = normal4(seed, group, sample, t, stream)
    # join adds a minor dimension: [[n0, n1], [n2, n3]] per group, flattened in element order.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (n0.shape[0], 4))


@triton.jit
def _philox_randn_kernel(out_ptr, t_ptr, seed, stream, sample_offset, n, first, BLOCK: tl.constexpr):
    sample = first + tl.program_id(1)
    group = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + sample)
    z = normal_tile(seed, group, sample + sample_offset, t, stream)
    # One contiguous [BLOCK, 4] tile: 16 (fp32) or 8 bytes a thread per store, not four strided stores.
    j = 4 * group[:, None] + tl.arange(0, 4)[None, :]
    tl.store(out_ptr + sample.to(tl.int64) * n + j, z.to(out_ptr.dtype.element_ty), mask=j < n)


@launch.on_device
def philox_randn(t: torch.Tensor, sample_shape, seed: int, stream: int, sample_offset: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Normals [B, *sample_shape] on t's device; t is a LongTensor [B] (validated by ddpm_fast.ops)."""
    B = t.numel()
    out = torch.empty((B, *sample_shape), dtype=dtype, device=t.device)
    n = out[0].numel() if B else 0
    if B == 0 or n == 0:
        return out
    BLOCK = 256
    t = t.contiguous()
    for first, count in launch.batch_chunks(B):
        _philox_randn_kernel[(triton.cdiv(triton.cdiv(n, 4), BLOCK), count)](out, t, seed, stream, sample_offset, n,
                                                                           first, BLOCK=BLOCK)
    return out


@triton.jit
def _philox4x32_kernel(out_ptr, counter_ptr, key_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = row < N
    c0 = tl.load(counter_ptr + 4 * row, mask=m).to(tl.uint32)
    c1 = tl.load(counter_ptr + 4 * row + 1, mask=m).to(tl.uint32)
    c2 = tl.load(counter_ptr + 4 * row + 2, mask=m).to(tl.uint32)
    c3 = tl.load(counter_ptr + 4 * row + 3, mask=m).to(tl.uint32)
    k0 = tl.load(key_ptr + 2 * row, mask=m).to(tl.uint64)
    k1 = tl.load(key_ptr + 2 * row + 1, mask=m).to(tl.uint64)
    r0, r1, r2, r3 = tl.philox(k0 | (k1 << 32), c0, c1, c2, c3, 10)
    tl.store(out_ptr + 4 * row, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * row + 1, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * row + 2, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * row + 3, r3.to(tl.int64), mask=m)


@launch.on_device
def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10 words: counter [N, 4] and key [N, 2] int64 holding uint32 -> [N, 4] int64."""
    N = counter.shape[0]
    out = torch.empty((N, 4), dtype=torch.int64, device=counter.device)
    if N:
        BLOCK = 64
        _philox4x32_kernel[(triton.cdiv(N, BLOCK),)](out, counter.contiguous(), key.contiguous(), N, BLOCK=BLOCK)
    return out
