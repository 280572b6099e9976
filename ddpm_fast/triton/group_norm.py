"""GroupNorm with fused input add, scale-shift and SiLU in Triton:
y = act(GN(x + add) * (1 + scale) + shift), statistics in fp32.

A group is Cg = C / G channels x HW positions, seen as a [HW, Cg] tile whose strides are
(1, HW) for NCHW and (C, 1) for channels_last, so both layouts share the kernels.
- on-chip path, grid (B*G,): a program loads its whole group once into registers, takes the mean,
  then the centred variance, and writes y: one read + one write.
- split path, grid (B*G, S): when a group is too large for registers or B*G programs would leave
  the GPU idle (batch 1), _gn_stats sums d and d^2 over HW / S positions per program and _gn_norm
  reduces the S partials and normalises its slice: two reads + one write.
Every path works on d = (x - x_first) + (add - add_first), exact for a large mean with a small
spread, so nothing rounds at the scale of the mean.
Bytes: (1 or 2) * N + N times sizeof(T); ~10 FLOPs per element (+4 with SiLU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ONCHIP_MAX = 8192  # elements of one group held in one program's registers


@triton.jit
def _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, HAS_ADD: tl.constexpr):
    """The group's first x and add: values are taken relative to them, (x - px) + (add - pa), which
    is exact for a large mean with a small spread."""
    px = tl.load(x_ptr + b.to(tl.int64) * C * HW + (g * CG).to(tl.int64) * stride_c).to(tl.float32)
    pa = 0.0
    if HAS_ADD:
        pa = tl.load(add_ptr + b * C + g * CG).to(tl.float32)
    return px, pa


@triton.jit
def _load_tile(x_ptr, add_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, pa, HAS_ADD: tl.constexpr):
    """Centred values d = (x - px) + (add - pa) of a [BLOCK_HW, BLOCK_C] tile, 0 outside the group."""
    c = g * CG + cl
    mask = (hw[:, None] < HW) & (cl[None, :] < CG)
    offs = b.to(tl.int64) * C * HW + c[None, :].to(tl.int64) * stride_c + hw[:, None].to(tl.int64) * stride_hw
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - px
    if HAS_ADD:
        d += tl.load(add_ptr + b * C + c, mask=cl < CG, other=0.0).to(tl.float32)[None, :] - pa
    return tl.where(mask, d, 0.0), offs, mask, c


@triton.jit
def _finish(y_ptr, d, mean, rstd, offs, mask, b, c, cmask, C, w_ptr, bias_ptr, scale_ptr, shift_ptr,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
            SILU: tl.constexpr):
    y = (d - mean) * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        y = y * (1.0 + tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :])
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_onchip(x_ptr, y_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, G, C, HW, CG, stride_c, stride_hw,
               count, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    bg = tl.program_id(0)
    b, g = bg // G, bg % G
    hw = tl.arange(0, BLOCK_HW)
    cl = tl.arange(0, BLOCK_C)
    px, pa = _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, HAS_ADD)
    d, offs, mask, c = _load_tile(x_ptr, add_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, pa, HAS_ADD)
    mean = tl.sum(tl.sum(d, 1), 0) / count
    dc = tl.where(mask, d - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(dc * dc, 1), 0) / count + eps)
    _finish(y_ptr, d, mean, rstd, offs, mask, b, c, cl < CG, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W, HAS_B,
            HAS_SCALE, HAS_SHIFT, SILU)


@triton.jit
def _gn_stats(x_ptr, add_ptr, part_ptr, G, C, HW, CG, stride_c, stride_hw, chunk, S, HAS_ADD: tl.constexpr,
              BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b, g = bg // G, bg % G
    cl = tl.arange(0, BLOCK_C)
    px, pa = _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, HAS_ADD)
    acc1 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    acc2 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        d, _, _, _ = _load_tile(x_ptr, add_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, pa, HAS_ADD)
        acc1 += d
        acc2 += d * d
    tl.store(part_ptr + (bg * S + s) * 2, tl.sum(tl.sum(acc1, 1), 0))
    tl.store(part_ptr + (bg * S + s) * 2 + 1, tl.sum(tl.sum(acc2, 1), 0))


@triton.jit
def _gn_norm(x_ptr, y_ptr, w_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, part_ptr, G, C, HW, CG, stride_c,
             stride_hw, chunk, S, count, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr,
             HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_HW: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b, g = bg // G, bg % G
    cl = tl.arange(0, BLOCK_C)
    px, pa = _pivot(x_ptr, add_ptr, b, g, C, HW, CG, stride_c, HAS_ADD)
    k = tl.arange(0, BLOCK_S)
    s1 = tl.sum(tl.load(part_ptr + (bg * S + k) * 2, mask=k < S, other=0.0), 0)
    s2 = tl.sum(tl.load(part_ptr + (bg * S + k) * 2 + 1, mask=k < S, other=0.0), 0)
    md = s1 / count
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / count - md * md, 0.0) + eps)
    for start in range(s * chunk, tl.minimum((s + 1) * chunk, HW), BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        d, offs, mask, c = _load_tile(x_ptr, add_ptr, b, g, hw, cl, HW, C, CG, stride_c, stride_hw, px, pa,
                                      HAS_ADD)
        _finish(y_ptr, d, md, rstd, offs, mask, b, c, cl < CG, C, w_ptr, bias_ptr, scale_ptr, shift_ptr, HAS_W,
                HAS_B, HAS_SCALE, HAS_SHIFT, SILU)


def _num_warps(tile: int) -> int:
    # About 8 values a thread at most (Triton's layer-norm heuristic); 4 warps on a 2048-value tile
    # spill under triton 3.6 (ddpm_fast.triton.compile_gate).
    return min(max(tile // 256, 1), 8)


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewest programs


def group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float, add, scale, shift, silu: bool,
               channels_last: bool, split: int = 0) -> torch.Tensor:
    """Launcher: arguments validated and laid out by ddpm_fast.ops.  ``split`` forces the number of
    slices per group (0: choose; 1 with a small group: the on-chip path)."""
    B, C = x.shape[:2]
    HW = x[0, 0].numel() if B and C else 0
    y = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if x.numel() == 0:
        return y
    G, CG = num_groups, C // num_groups
    stride_c, stride_hw = (1, C) if channels_last else (HW, 1)
    BLOCK_C = triton.next_power_of_2(CG)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=bool(silu))
    ptrs = [t if t is not None else x for t in (weight, bias, add, scale, shift)]
    count = float(HW * CG)  # a float: an int argument equal to 1 would become a constant, and int.to() fails
    onchip_hw = triton.next_power_of_2(HW)
    fits = onchip_hw * BLOCK_C <= ONCHIP_MAX
    if split == 0:
        split = 1 if fits and B * G >= _programs_wanted(x.device) else max(1, _programs_wanted(x.device) // (B * G))
    if split == 1 and fits:
        _gn_onchip[(B * G,)](x, y, *ptrs, G, C, HW, CG, stride_c, stride_hw, count, eps, BLOCK_HW=onchip_hw,
                             BLOCK_C=BLOCK_C, num_warps=_num_warps(onchip_hw * BLOCK_C), **flags)
        return y
    BLOCK_HW = max(1, min(triton.next_power_of_2(HW), 2048 // BLOCK_C))
    S = max(1, min(split, triton.cdiv(HW, BLOCK_HW), 256))
    chunk = triton.cdiv(triton.cdiv(HW, S), BLOCK_HW) * BLOCK_HW
    S = triton.cdiv(HW, chunk)
    part = torch.empty((B * G, S, 2), dtype=torch.float32, device=x.device)
    num_warps = _num_warps(BLOCK_HW * BLOCK_C)
    _gn_stats[(B * G, S)](x, ptrs[2], part, G, C, HW, CG, stride_c, stride_hw, chunk, S,
                          HAS_ADD=flags["HAS_ADD"], BLOCK_HW=BLOCK_HW, BLOCK_C=BLOCK_C, num_warps=num_warps)
    _gn_norm[(B * G, S)](x, y, *ptrs, part, G, C, HW, CG, stride_c, stride_hw, chunk, S, count, eps, BLOCK_HW=BLOCK_HW,
                         BLOCK_C=BLOCK_C, BLOCK_S=triton.next_power_of_2(S), num_warps=num_warps, **flags)
    return y
