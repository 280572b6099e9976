"""softmax(q k^T * scale) v on [B, heads, L, d], and the DDPM U-Net's attention block.

The block (diffusers' Attention with one head of d = C, the original AttnBlock):
    h = GroupNorm(x) viewed as tokens [B, L = H*W, C]
    q, k, v = h W_q^T + b_q, h W_k^T + b_k, h W_v^T + b_v
    y = x + (attention(q, k, v) W_o^T + b_o) viewed back as [B, C, H, W]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks
from .group_norm import group_norm_math


# The largest head dimension the Triton and CUDA kernels take; above it ops.attention uses SDPA.
MAX_KERNEL_HEAD_DIM = 256


def check_attention(q, k, v, scale):
    for name, a in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(a, name)
        if a.dim() != 4:
            raise ValueError(f"{name}: expected shape [B, heads, L, d], got {tuple(a.shape)}")
    _checks.same_device(q, "q", k=k, v=v)
    for name, a in (("k", k), ("v", v)):
        if a.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {a.dtype}")
    if q.shape[-1] == 0:
        raise ValueError("q: the head dimension d must be at least 1, got 0")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v: expected q [B, h, Lq, d] and k, v [B, h, Lk, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("k: expected at least one key (Lk >= 1): softmax over no keys is undefined")
    if scale is not None:
        _checks.positive_float(scale, "scale")


def attention_math(q, k, v, scale):
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(cd)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    check_attention(q, k, v, scale)
    return attention_math(q, k, v, scale)


def attention_block(x, norm_weight, norm_bias, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o,
                    num_groups: int = 32, eps: float = 1e-6, heads: int = 1) -> torch.Tensor:
    """The U-Net's self-attention block on x [B, C, H, W] (see the module docstring)."""
    _checks.tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, C, H, W], got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if C % heads:
        raise ValueError(f"heads: {C} channels are not divisible by heads={heads}")
    h = group_norm_math(x, num_groups, norm_weight, norm_bias, eps, None, None, None, False)
    tokens = h.reshape(B, C, H * W).transpose(1, 2)

    def proj(w, b):
        return F.linear(tokens, w, b).reshape(B, H * W, heads, C // heads).transpose(1, 2)

    o = attention_math(proj(w_q, b_q), proj(w_k, b_k), proj(w_v, b_v), None)
    o = F.linear(o.transpose(1, 2).reshape(B, H * W, C), w_o, b_o)
    return x + o.transpose(1, 2).reshape(B, C, H, W)
