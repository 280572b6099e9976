"""Flash attention forward in Triton: o = softmax(q k^T * scale) v on [B, heads, L, d], online
softmax over key blocks, the L x L scores never written to memory.

Grid (cdiv(Lq, BLOCK_M), B * heads), B * heads in launches of at most 65535 (launch.py): a program
owns BLOCK_M queries and streams every key/value block of its head through registers. d is padded to
a power of two >= 16 (masked), up to 256.
Block sizes depend on d, the dtype and the GPU (_config): on sm_90 the dots are wgmma wherever the
registers allow (all but fp32 at d = 256), elsewhere mma.sync.
fp16/bf16 run the two GEMMs on tensor cores with fp32 accumulation (p is rounded to the input dtype
for the second, as flash attention does).
fp32 (DDPMSampler's default dtype) runs them on tensor cores too, as tf32x3: each operand x is split
into hi = tf32(x) and lo = x - hi, and a b = hi_a hi_b + hi_a lo_b + lo_a hi_b, which drops only the
~2^-22 relative lo_a lo_b term.  With that rounding emulated on the CPU (tests/test_attention.py), the
error ||o - ref|| / ||ref|| against float64 at the CIFAR U-Net's attention (L = 256, d = 256, random
normal q, k, v) is about 4e-7, as with full-fp32 ("ieee") dots, where plain tf32 (one product of
10-bit mantissas) gives 4e-4 with rounded operands and 1.4e-3 with truncated ones (what a tensor core
does with an fp32 register): too coarse for the fp32 contract of 1e-5.  The GPU test holds it under
2e-6.  Three tf32 MMAs per product still beat FMA dots: A100 and H100 peak tf32 / 3 is about 2.5x
their fp32 FMA rate (156 / 3 vs 19.5, 495 / 3 vs 67 TFLOP/s).
Bytes: (Lq + 2 Lk) d + Lq d per head, times sizeof(T); FLOPs: 4 Lq Lk d per head (tf32x3: 3x on
the tensor cores).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launch

# Triton's CPU interpreter computes bf16 dots wrongly (garbage, seen on triton 3.6 and 3.8), so under
# TRITON_INTERPRET=1 bf16 operands are widened to fp32 first; GPUs run the bf16 tensor-core dots.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, H, Lq, Lk,
                   D, qk_scale, first_bh, WIDEN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = first_bh + tl.program_id(1)
    b = bh // H
    h = bh % H
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    nb = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_base + m[:, None] * sql + d[None, :] * sqd, mask=(m[:, None] < Lq) & (d[None, :] < D), other=0.0)
    if WIDEN:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_N):
        n = start + nb
        kv_mask = (n[:, None] < Lk) & (d[None, :] < D)
        k = tl.load(k_base + n[:, None] * skl + d[None, :] * skd, mask=kv_mask, other=0.0)
        if WIDEN:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(n[None, :] < Lk, s * qk_scale, float("-inf"))  # qk_scale includes log2(e): exp2 below
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * svl + d[None, :] * svd, mask=kv_mask, other=0.0)
        if WIDEN:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    o_base = o_ptr + bh.to(tl.int64) * Lq * D
    tl.store(o_base + m[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(m[:, None] < Lq) & (d[None, :] < D))


@launch.on_device
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Launcher: validated by ddpm_fast.ops (d <= 256, Lk >= 1); any strides; returns a contiguous
    [B, H, Lq, d]."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config(q.dtype, BLOCK_D, _target_arch())
    for first, count in launch.batch_chunks(B * H):
        _attention_fwd[(triton.cdiv(Lq, BLOCK_M), count)](
            q, k, v, o, *q.stride(), *k.stride(), *v.stride(), H, Lq, Lk, D, scale * 1.4426950408889634, first,
            WIDEN=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and INTERPRETED),
            # Only fp32 operands read the precision (16-bit ones are exact on tensor cores);
            # the interpreter ignores it and multiplies in full fp32.
            PRECISION="tf32x3" if q.dtype == torch.float32 else "ieee",
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)
    return o


def _target_arch() -> int:
    """The compute capability Triton compiles for (the compile gate's stand-in target included); 0 under
    the interpreter, which has no target."""
    return 0 if INTERPRETED else triton.runtime.driver.active.get_current_target().arch


def _config(dtype: torch.dtype, block_d: int, arch: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head size on a compute capability, chosen
    with the compile gate under triton 3.6 and 3.8: no spills, and at most 96 KB of shared memory, under
    the limits of sm_80, sm_86/89 and sm_90.  sm_9x runs a dot as wgmma only where each warpgroup (4
    warps) owns 64 query rows; other GPUs (and tiles below that) get mma.sync."""
    hopper = arch // 10 == 9
    if dtype == torch.float32:
        # tf32x3 holds the two tf32 halves of each operand: about twice the registers of a 16-bit tile.
        # At d = 256 every BLOCK_M = 64 tile spills on sm_90 (>= 1 KB: the 64 x 256 fp32 accumulator with
        # q's halves), so d = 256 runs mma.sync on 16-row tiles, 8 warps splitting its columns.  mma.sync
        # keeps q in registers: on sm_80, 64-row tiles spill from an unaligned d = 33 on.
        if block_d <= 32:
            return (64, 32, 4, 2) if hopper else (64, 32, 8, 2)
        if block_d <= 128:
            return (64, 32, 4, 2 if block_d == 64 else 1) if hopper else (32, 32, 4, 2)
        return (16, 16, 8, 2)
    if block_d <= 64:
        return (64, 64, 4, 3)
    if block_d == 128:
        # sm_80 under triton 3.6 spills 8 + 8 bytes with 3 stages.
        return (64, 32, 8, 3) if hopper else (64, 32, 8, 2)
    # d = 256 on sm_90: two warpgroups share the 64 rows' columns (with 4 warps, an unaligned d such as
    # 200 spills 120 bytes).
    return (64, 32, 8, 2) if hopper else (32, 32, 8, 3)
