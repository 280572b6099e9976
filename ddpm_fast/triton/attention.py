"""Flash attention forward in Triton: o = softmax(q k^T * scale) v on [B, heads, L, d], online
softmax over key blocks, the L x L scores never written to memory.

Grid (cdiv(Lq, BLOCK_M), B * heads): a program owns BLOCK_M queries and streams every key/value
block of its head through registers.  d is padded to a power of two >= 16 (masked), up to 256.
fp16/bf16 run the two GEMMs on tensor cores with fp32 accumulation (p is rounded to the input dtype
for the second, as flash attention does); fp32 inputs use full-fp32 ("ieee") dots, not tf32, so
fp32 keeps ~1e-6 relative error.
Bytes: (Lq + 2 Lk) d + Lq d per head, times sizeof(T); FLOPs: 4 Lq Lk d per head.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter computes bf16 dots wrongly (garbage, seen on triton 3.6 and 3.8), so under
# TRITON_INTERPRET=1 bf16 operands are widened to fp32 first; GPUs run the bf16 tensor-core dots.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, H, Lq, Lk,
                   D, qk_scale, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    nb = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    q = tl.load(q_base + m[:, None] * sql + d[None, :] * sqd, mask=(m[:, None] < Lq) & (d[None, :] < D), other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_N):
        n = start + nb
        kv_mask = (n[:, None] < Lk) & (d[None, :] < D)
        k = tl.load(k_base + n[:, None] * skl + d[None, :] * skd, mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n[None, :] < Lk, s * qk_scale, float("-inf"))  # qk_scale includes log2(e): exp2 below
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * svl + d[None, :] * svd, mask=kv_mask, other=0.0)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    o_base = o_ptr + bh.to(tl.int64) * Lq * D
    tl.store(o_base + m[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=(m[:, None] < Lq) & (d[None, :] < D))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Launcher: validated by ddpm_fast.ops (d <= 256, Lk >= 1); any strides; returns a contiguous
    [B, H, Lq, d]."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if q.dtype == torch.float32:
        # fp32 tiles take twice the registers and shared memory of 16-bit ones: these compile
        # without spills under triton 3.6 and 3.8 (ddpm_fast.triton.compile_gate) and, at d = 256,
        # fit the 163 KB of shared memory an sm_80 block can have.
        BLOCK_M, BLOCK_N, num_warps = (64, 32, 8) if BLOCK_D <= 128 else (16, 16, 4)
    else:
        BLOCK_M = 64 if BLOCK_D <= 128 else 32
        BLOCK_N = 64 if BLOCK_D <= 64 else 32
        num_warps = 4 if BLOCK_D <= 64 else 8
    grid = (triton.cdiv(Lq, BLOCK_M), B * H)
    _attention_fwd[grid](q, k, v, o, *q.stride(), *k.stride(), *v.stride(), H, Lq, Lk, D, scale * 1.4426950408889634,
                         FP32_DOT=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and INTERPRETED),
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return o
