"""GroupNorm with fused input add, scale-shift and SiLU in Triton:
y = act(GN(x + add) * (1 + scale) + shift), statistics in fp32.

A group is Cg = C / G channels x HW positions, seen as a [HW, Cg] tile whose strides are
(1, HW) for NCHW and (C, 1) for channels_last, so both layouts share the kernels.
- on-chip path, grid (B*G,): a program loads its whole group once into registers, takes the mean,
  then the centred variance, and writes y: one read + one write.
- split path, grid (B*G, S): when a group is too large for registers or B*G programs would leave
  the GPU idle (batch 1), _gn_stats takes the moments (count, mean, M2) of d over HW / S positions
  per program, Welford's update per tile element, and _gn_norm merges the S partials and
  normalises its slice: two reads + one write.
Every path works on d = (x - px) + (add - pa) relative to the group's pivot (_pivot), exact for a
large mean with a small spread, so nothing rounds at the scale of the mean, and takes the
variance from centred squares, never as E[d^2] - E[d]^2 (which loses every digit when one value
lies far from the rest).  The group's mean of d and rstd (float32 [B, G]) go out for the
backward, which takes values relative to the same pivot.
Bytes: (1 or 2) * N + N times sizeof(T); ~10 FLOPs per element (+4 with SiLU).

Backward (formula in csrc/include/ddpm_fast/group_norm.h), the same two paths:
- on-chip, grid (B*G,): a program loads its group's x and dy once, recomputes xhat and
  dz = dy act'(z), sums S1, S2, S3 per channel (stored, rows 0-2 of [4, B, C]), forms m1, m2 and
  writes dx.  Two reads + one write.
- split, grid (B*G, S): _gnb_sums stores per-slice per-channel sums; _gnb_dx reduces them (slice 0
  stores the totals) and writes dx for its slice.  Four reads + one write.
Then row 3, the add's gradient, from the totals with [B, C]-sized torch ops (_with_add_grad).
~15 FLOPs per element (+6 with SiLU's derivative).  The ops at the end (ddpm_fast_triton::*) are
torch.library custom ops over the launchers, so they trace under torch.compile; ddpm_fast.ops
registers their autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops_meta import group_norm_backward_fake, group_norm_fake
from . import launch

ONCHIP_MAX = 8192  # elements of one group held in one program's registers
BWD_ONCHIP_MAX = 4096  # the backward holds x and dy


@triton.jit
def _pivot_value(x_ptr, add_ptr, b, g, k, q, C, HW, CG, stride_c, stride_hw, HAS_ADD: tl.constexpr):
    """x and add of the group's value at channel k, position q."""
    c = g * CG + k
    xv = tl.load(x_ptr + b.to(tl.int64) * C * HW + c.to(tl.int64) * stride_c + q.to(tl.int64) * stride_hw)
    av = 0.0
    if HAS_ADD:
        av = tl.load(add_ptr + b * C + c).to(tl.float32)
    return xv.to(tl.float32), av


@triton.jit
def _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, stride_hw, HAS_ADD: tl.constexpr):
    """The group's pivot (csrc/include/ddpm_fast/group_norm.h, gn_pivot): of its values x + add at
    (channel 0, position 0), (CG / 2, HW / 2) and (CG - 1, HW - 1), the median's x and add.  Values are
    taken relative to it, (x - px) + (add - pa), exact for a large mean with a small spread; each
    rounds at |pivot - mean| 2^-24, and the median of three is not an outlier unless two are."""
    z = g * 0  # a tensor: CG or HW equal to 1 arrive as constants, and ints have no .to()
    x0, a0 = _pivot_value(x_ptr, add_ptr, b, g, z, z, C, HW, CG, stride_c, stride_hw, HAS_ADD)
    x1, a1 = _pivot_value(x_ptr, add_ptr, b, g, z + CG // 2, z + HW // 2, C, HW, CG, stride_c, stride_hw, HAS_ADD)
    x2, a2 = _pivot_value(x_ptr, add_ptr, b, g, z + CG - 1, z + HW - 1, C, HW, CG, stride_c, stride_hw, HAS_ADD)
    v0, v1, v2 = x0 + a0, x1 + a1, x2 + a2
    mid = (v0 <= v1) == (v1 <= v2)
    first = (v1 < v0) == (v0 < v2)
    return tl.where(mid, x1, tl.where(first, x0, x2)), tl.where(mid, a1, tl.where(first, a0, a2))


@triton.jit
def _channel_add(add_ptr, b, g, cl, C, CG, pa, HAS_ADD: tl.constexpr):
    """The add of the program's channels relative to the pivot's, (add - pa), read once per program."""
    if HAS_ADD:
        a = tl.load(add_ptr + b * C + g * CG + cl, mask=cl < CG, other=0.0).to(tl.float32) - pa
    else:
        a = tl.zeros(cl.shape, tl.float32)
    return a


@triton.jit
def _load_tile(x_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, add):
    """Centred values d = (x - px) + (add - pa) of a [BLOCK_HW, BLOCK_C] tile, 0 outside the group."""
    mask = (hw[:, None] < HW) & (cl[None, :] < CG)
    offs = (b.to(tl.int64) * C * HW + (g * CG + cl)[None, :].to(tl.int64) * stride_c
            + hw[:, None].to(tl.int64) * stride_hw)
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - px + add[None, :]
    return tl.where(mask, d, 0.0), offs, mask


@triton.jit
def _affine(w_ptr, bias_ptr, scale_ptr, shift_ptr, b, g, cl, C, CG, mean, rstd, HAS_W: tl.constexpr,
            HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per channel (A, K) with y = d A + K = ((d - mean) rstd w + bias) (1 + scale) + shift: weight,
    bias, scale, shift and the statistics folded once per program, one FMA per value after."""
    c = g * CG + cl
    cmask = cl < CG
    w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32) if HAS_W else tl.full(cl.shape, 1.0, tl.float32)
    k = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32) if HAS_B else tl.zeros(cl.shape, tl.float32)
    if HAS_SCALE:
        s = 1.0 + tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)
        w = w * s
        k = k * s
    if HAS_SHIFT:
        k = k + tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    a = rstd * w
    return a, k - mean * a


@triton.jit
def _finish(y_ptr, d, a, k, offs, mask, SILU: tl.constexpr):
    y = d * a[None, :] + k[None, :]
    if SILU:
        # A division without IEEE rounding: no slow-path call in the loop (2 ulps, under the
        # output's rounding in every dtype).
        y = tl.fdiv(y, 1.0 + tl.exp(-y))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_onchip(x_ptr, y_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, G, C, HW, CG,
               stride_c, stride_hw, count, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_HW: tl.constexpr,
               BLOCK_C: tl.constexpr):
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    hw = tl.arange(0, BLOCK_HW)
    cl = tl.arange(0, BLOCK_C)
    px, pa = _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, stride_hw, HAS_ADD)
    add = _channel_add(add_ptr, b, g, cl, C, CG, pa, HAS_ADD)
    d, offs, mask = _load_tile(x_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, add)
    mean = tl.sum(tl.sum(d, 1), 0) / count
    dc = tl.where(mask, d - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(dc * dc, 1), 0) / count + eps)
    tl.store(mean_ptr + bg, mean)
    tl.store(rstd_ptr + bg, rstd)
    a, k = _affine(w_ptr, bias_ptr, scale_ptr, shift_ptr, b, g, cl, C, CG, mean, rstd, HAS_W, HAS_B, HAS_SCALE,
                   HAS_SHIFT)
    _finish(y_ptr, d, a, k, offs, mask, SILU)


@triton.jit
def _gn_stats(x_ptr, add_ptr, part_ptr, G, C, HW, CG, stride_c, stride_hw, chunk, S, HAS_ADD: tl.constexpr,
              BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b, g = bg // G, bg % G
    cl = tl.arange(0, BLOCK_C)
    px, pa = _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, stride_hw, HAS_ADD)
    add = _channel_add(add_ptr, b, g, cl, C, CG, pa, HAS_ADD)
    # Per tile element: its count, mean and M2 so far.  Only the slice's last tile can end past HW,
    # so every element still in the group has been in every tile so far: the count is the tile's.
    # Elements past HW in the last tile keep what they had (d is 0 there, their mean need not be).
    cnt = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    mean = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    m2 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    first = s * chunk
    for start in range(first, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        d, _, mask = _load_tile(x_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, add)
        inv = 1.0 / ((start - first) // BLOCK_HW + 1).to(tl.float32)
        delta = tl.where(mask, d - mean, 0.0)
        mean += delta * inv
        m2 += delta * (d - mean)
        cnt += mask.to(tl.float32)
    n = tl.sum(tl.sum(cnt, 1), 0)
    m = tl.sum(tl.sum(cnt * mean, 1), 0) / n
    dm = mean - m
    tl.store(part_ptr + (bg * S + s) * 3, n)
    tl.store(part_ptr + (bg * S + s) * 3 + 1, m)
    tl.store(part_ptr + (bg * S + s) * 3 + 2, tl.sum(tl.sum(m2 + cnt * dm * dm, 1), 0))


@triton.jit
def _gn_norm(x_ptr, y_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr, G, C, HW,
             CG, stride_c, stride_hw, chunk, S, count, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
             HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
             BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b, g = bg // G, bg % G
    cl = tl.arange(0, BLOCK_C)
    px, pa = _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, stride_hw, HAS_ADD)
    # The S partial moments merged: mean = sum n mean / n, M2 = sum (M2 + n (mean_s - mean)^2).
    sl = tl.arange(0, BLOCK_S)
    ns = tl.load(part_ptr + (bg * S + sl) * 3, mask=sl < S, other=0.0)
    ms = tl.load(part_ptr + (bg * S + sl) * 3 + 1, mask=sl < S, other=0.0)
    m2s = tl.load(part_ptr + (bg * S + sl) * 3 + 2, mask=sl < S, other=0.0)
    md = tl.sum(ns * ms, 0) / count
    dm = ms - md
    rstd = 1.0 / tl.sqrt(tl.sum(m2s + ns * dm * dm, 0) / count + eps)
    if s == 0:
        tl.store(mean_ptr + bg, md)
        tl.store(rstd_ptr + bg, rstd)
    add = _channel_add(add_ptr, b, g, cl, C, CG, pa, HAS_ADD)
    a, k = _affine(w_ptr, bias_ptr, scale_ptr, shift_ptr, b, g, cl, C, CG, md, rstd, HAS_W, HAS_B, HAS_SCALE,
                   HAS_SHIFT)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        d, offs, mask = _load_tile(x_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, add)
        _finish(y_ptr, d, a, k, offs, mask, SILU)


def _num_warps(tile: int, most: int = 8) -> int:
    # About 8 values a thread (Triton's layer-norm heuristic), up to `most` warps: 4 warps on a 2048-value
    # tile spill under triton 3.6 (ddpm_fast.triton.compile_gate).  Beyond 8 warps the block reductions
    # cost more than the registers save, but for the backward's on-chip tile (x and dy, 4096 values),
    # which spills with 8.
    return min(max(tile // 256, 1), most)


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewest programs


def _split_geometry(HW: int, BLOCK_HW: int, split: int):
    """(slices, rows per slice) for the split paths."""
    S = max(1, min(split, triton.cdiv(HW, BLOCK_HW), 256))
    chunk = triton.cdiv(triton.cdiv(HW, S), BLOCK_HW) * BLOCK_HW
    return triton.cdiv(HW, chunk), chunk


def _geometry(x: torch.Tensor, num_groups: int, channels_last: bool):
    B, C = x.shape[:2]
    HW = x[0, 0].numel() if B and C else 0
    CG = C // num_groups
    stride_c, stride_hw = (1, C) if channels_last else (HW, 1)
    return B, C, HW, CG, stride_c, stride_hw, triton.next_power_of_2(CG)


@launch.on_device
def group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float, add, scale, shift, silu: bool,
               channels_last: bool, split: int = 0):
    """Launcher: arguments validated and laid out by ddpm_fast.ops.  Returns (y, mean, rstd).
    ``split`` forces the number of slices per group (0: choose; 1 with a small group: the on-chip path)."""
    B, C, HW, CG, stride_c, stride_hw, BLOCK_C = _geometry(x, num_groups, channels_last)
    G = num_groups
    y = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean.zero_(), rstd.zero_()
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu))
    ptrs = [t if t is not None else x for t in (weight, bias, add, scale, shift)]
    count = float(HW * CG)  # a float: an int argument equal to 1 would become a constant, and int.to() fails
    onchip_hw = triton.next_power_of_2(HW)
    fits = onchip_hw * BLOCK_C <= ONCHIP_MAX
    if split == 0:
        split = 1 if fits and B * G >= _programs_wanted(x.device) else max(1, _programs_wanted(x.device) // (B * G))
    if split == 1 and fits:
        _gn_onchip[(B * G,)](x, y, *ptrs, mean, rstd, G, C, HW, CG, stride_c, stride_hw, count, eps,
                             BLOCK_HW=onchip_hw, BLOCK_C=BLOCK_C, num_warps=_num_warps(onchip_hw * BLOCK_C), **flags)
        return y, mean, rstd
    BLOCK_HW = max(1, min(triton.next_power_of_2(HW), 2048 // BLOCK_C))
    S, chunk = _split_geometry(HW, BLOCK_HW, split)
    part = torch.empty((B * G, S, 3), dtype=torch.float32, device=x.device)
    num_warps = _num_warps(BLOCK_HW * BLOCK_C)
    _gn_stats[(B * G, S)](x, ptrs[2], part, G, C, HW, CG, stride_c, stride_hw, chunk, S,
                          HAS_ADD=flags["HAS_ADD"], BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=num_warps)
    _gn_norm[(B * G, S)](x, y, *ptrs, mean, rstd, part, G, C, HW, CG, stride_c, stride_hw, chunk, S, count, eps,
                         BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, BLOCK_S=triton.next_power_of_2(S), num_warps=num_warps,
                         **flags)
    return y, mean, rstd


# ------------------------------------------------------------------------------ backward
@triton.jit
def _gnb_channels(w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, b, c, cmask, C, HAS_W: tl.constexpr,
                  HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per channel: the input add, and W, Bc with z = xhat * W + Bc, in float32 whatever the parameters' dtype."""
    zero = c.to(tl.float32) * 0.0
    add = zero
    W = zero + 1.0
    Bc = zero
    if HAS_ADD:
        add = tl.load(add_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_W:
        W = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        Bc = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = 1.0 + tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)
        W = W * s
        Bc = Bc * s
    if HAS_SHIFT:
        Bc = Bc + tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)
    return add, W, Bc


@triton.jit
def _gnb_tile(x_ptr, dy_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, centre, rstd, W, Bc,
              SILU: tl.constexpr):
    """xhat = ((x - px) + centre) rstd and dz = dy act'(z) of a [BLOCK_HW, BLOCK_C] tile, 0 outside
    the group; centre = (add - pa) - md per channel."""
    c = g * CG + cl
    mask = (hw[:, None] < HW) & (cl[None, :] < CG)
    offs = b.to(tl.int64) * C * HW + c[None, :].to(tl.int64) * stride_c + hw[:, None].to(tl.int64) * stride_hw
    xh = ((tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - px) + centre[None, :]) * rstd
    gz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        z = xh * W[None, :] + Bc[None, :]
        sig = 1.0 / (1.0 + tl.exp(-z))
        gz = gz * sig * (1.0 + z * (1.0 - sig))
    return tl.where(mask, xh, 0.0), tl.where(mask, gz, 0.0), offs, mask


@triton.jit
def _gnb_group(x_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, b, g, bg, cl, C, HW, CG,
               stride_c, stride_hw, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """What every backward program of group (b, g) needs first: the pivot x, rstd, each channel's centre
    and its W, Bc."""
    px, pa = _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, stride_hw, HAS_ADD)
    add, W, Bc = _gnb_channels(w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, b, g * CG + cl, cl < CG, C, HAS_W,
                               HAS_B, HAS_ADD, HAS_SCALE, HAS_SHIFT)
    return px, tl.load(rstd_ptr + bg), (add - pa) - tl.load(mean_ptr + bg), W, Bc


@triton.jit
def _gnb_onchip(dy_ptr, x_ptr, dx_ptr, sums_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr,
                B, G, C, HW, CG, stride_c, stride_hw, count, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    cl = tl.arange(0, BLOCK_C)
    c = g * CG + cl
    cmask = cl < CG
    px, rstd, centre, W, Bc = _gnb_group(x_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr,
                                         b, g, bg, cl, C, HW, CG, stride_c, stride_hw, HAS_W, HAS_B, HAS_ADD,
                                         HAS_SCALE, HAS_SHIFT)
    xh, gz, offs, mask = _gnb_tile(x_ptr, dy_ptr, b, g, tl.arange(0, BLOCK_HW), cl, HW, C, CG, stride_c, stride_hw,
                                   px, centre, rstd, W, Bc, SILU)
    s1 = tl.sum(gz, 0)
    s2 = tl.sum(gz * xh, 0)
    tl.store(sums_ptr + b * C + c, s1, mask=cmask)
    tl.store(sums_ptr + (B + b) * C + c, s2, mask=cmask)
    tl.store(sums_ptr + (2 * B + b) * C + c, tl.sum(xh, 0), mask=cmask)
    m1 = tl.sum(W * s1, 0) / count
    m2 = tl.sum(W * s2, 0) / count
    dx = rstd * ((W[None, :] * gz - m1) - xh * m2)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gnb_sums(dy_ptr, x_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, G, C, HW,
              CG, stride_c, stride_hw, chunk, S, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_HW: tl.constexpr,
              BLOCK_C: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b, g = bg // G, bg % G
    cl = tl.arange(0, BLOCK_C)
    px, rstd, centre, W, Bc = _gnb_group(x_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr,
                                         b, g, bg, cl, C, HW, CG, stride_c, stride_hw, HAS_W, HAS_B, HAS_ADD,
                                         HAS_SCALE, HAS_SHIFT)
    acc1 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    acc2 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    acc3 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        xh, gz, _, _ = _gnb_tile(x_ptr, dy_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, centre, rstd, W,
                                 Bc, SILU)
        acc1 += gz
        acc2 += gz * xh
        acc3 += xh
    base = part_ptr + (bg * S + s) * 3 * BLOCK_C + cl
    tl.store(base, tl.sum(acc1, 0))
    tl.store(base + BLOCK_C, tl.sum(acc2, 0))
    tl.store(base + 2 * BLOCK_C, tl.sum(acc3, 0))


@triton.jit
def _gnb_dx(dy_ptr, x_ptr, dx_ptr, sums_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr,
            shift_ptr, B, G, C, HW, CG, stride_c, stride_hw, chunk, S, count, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
            BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b, g = bg // G, bg % G
    cl = tl.arange(0, BLOCK_C)
    c = g * CG + cl
    cmask = cl < CG
    px, rstd, centre, W, Bc = _gnb_group(x_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr,
                                         b, g, bg, cl, C, HW, CG, stride_c, stride_hw, HAS_W, HAS_B, HAS_ADD,
                                         HAS_SCALE, HAS_SHIFT)
    k = tl.arange(0, BLOCK_S)
    rows = part_ptr + (bg * S + k[:, None]) * 3 * BLOCK_C + cl[None, :]
    pmask = (k[:, None] < S) & cmask[None, :]
    s1 = tl.sum(tl.load(rows, mask=pmask, other=0.0), 0)
    s2 = tl.sum(tl.load(rows + BLOCK_C, mask=pmask, other=0.0), 0)
    if s == 0:
        tl.store(sums_ptr + b * C + c, s1, mask=cmask)
        tl.store(sums_ptr + (B + b) * C + c, s2, mask=cmask)
        tl.store(sums_ptr + (2 * B + b) * C + c, tl.sum(tl.load(rows + 2 * BLOCK_C, mask=pmask, other=0.0), 0),
                 mask=cmask)
    m1 = tl.sum(W * s1, 0) / count
    m2 = tl.sum(W * s2, 0) / count
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        xh, gz, offs, mask = _gnb_tile(x_ptr, dy_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, centre, rstd,
                                       W, Bc, SILU)
        dx = rstd * ((W[None, :] * gz - m1) - xh * m2)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@launch.on_device
def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                        weight, bias, add, scale, shift, silu: bool, channels_last: bool, split: int = 0):
    """Launcher of the backward: dy in x's dtype and layout.  Returns (dx, sums [4, B, C] float32: S1, S2,
    S3 and the add's gradient, as the C++ ops do)."""
    B, C, HW, CG, stride_c, stride_hw, BLOCK_C = _geometry(x, num_groups, channels_last)
    G = num_groups
    dx = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    sums = torch.empty((4, B, C), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return dx, sums.zero_()
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu))
    ptrs = [t if t is not None else x for t in (weight, bias, add, scale, shift)]
    count = float(HW * CG)
    onchip_hw = triton.next_power_of_2(HW)
    fits = onchip_hw * BLOCK_C <= BWD_ONCHIP_MAX
    if split == 0:
        split = 1 if fits and B * G >= _programs_wanted(x.device) else max(1, _programs_wanted(x.device) // (B * G))
    if split == 1 and fits:
        _gnb_onchip[(B * G,)](dy, x, dx, sums, mean, rstd, *ptrs, B, G, C, HW, CG, stride_c, stride_hw, count,
                              BLOCK_HW=onchip_hw, BLOCK_C=BLOCK_C, num_warps=_num_warps(onchip_hw * BLOCK_C, 16),
                              **flags)
        return dx, _with_add_grad(sums, rstd, G, HW, weight, scale)
    BLOCK_HW = max(1, min(triton.next_power_of_2(HW), 1024 // BLOCK_C))
    S, chunk = _split_geometry(HW, BLOCK_HW, split)
    part = torch.empty((B * G, S, 3, BLOCK_C), dtype=torch.float32, device=x.device)
    num_warps = _num_warps(BLOCK_HW * BLOCK_C)
    _gnb_sums[(B * G, S)](dy, x, part, mean, rstd, *ptrs, G, C, HW, CG, stride_c, stride_hw, chunk, S,
                          BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=num_warps, **flags)
    _gnb_dx[(B * G, S)](dy, x, dx, sums, part, mean, rstd, *ptrs, B, G, C, HW, CG, stride_c, stride_hw, chunk, S, count,
                        BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, BLOCK_S=triton.next_power_of_2(S), num_warps=num_warps,
                        **flags)
    return dx, _with_add_grad(sums, rstd, G, HW, weight, scale)


def _with_add_grad(sums, rstd, G, HW, weight, scale):
    """sums[3] = dadd = rstd (W S1 - HW m1 - m2 S3) from the kernels' S1..S3 (gn_dadd of
    csrc/include/ddpm_fast/group_norm.h), with W = w (1 + scale) and m1, m2 its group's sums of W S1,
    W S2 over n: [B, C]-sized torch work."""
    S1, S2, S3 = sums[0], sums[1], sums[2]
    B, C = S1.shape
    W = torch.ones_like(S1) if weight is None else weight.expand(B, C)
    W = W if scale is None else W * (1 + scale)
    ws1, ws2 = (W * S1).reshape(B, G, -1), (W * S2).reshape(B, G, -1)
    n = HW * (C // G)
    m1, m2 = ws1.sum(-1, keepdim=True) / n, ws2.sum(-1, keepdim=True) / n
    sums[3] = (rstd[..., None] * ((ws1 - HW * m1) - m2 * S3.reshape(B, G, -1))).reshape(B, C)
    return sums


# ---------------------------------------------------------------------------- the ops
group_norm_op = torch.library.custom_op(
    "ddpm_fast_triton::group_norm", group_norm, mutates_args=(),
    schema="(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, Tensor? add, Tensor? scale, "
           "Tensor? shift, bool silu, bool channels_last) -> (Tensor, Tensor, Tensor)")
group_norm_op.register_fake(group_norm_fake)
group_norm_backward_op = torch.library.custom_op(
    "ddpm_fast_triton::group_norm_backward", group_norm_backward, mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor mean, Tensor rstd, int num_groups, Tensor? weight, Tensor? bias, "
           "Tensor? add, Tensor? scale, Tensor? shift, bool silu, bool channels_last) -> (Tensor, Tensor)")
group_norm_backward_op.register_fake(group_norm_backward_fake)
