"""Benchmark cases for attention: the core op against SDPA with each backend torch has here, and
the U-Net's whole attention block (fused) against diffusers' eager Attention block and
torch.compile of the reference block."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import ops
from .. import reference as ref
from .diffusion import Case, kernel_backends
from .harness import optional, try_build

# (label, B, heads, L, d): DDPM CIFAR-10's single head of d = 256 over 16x16 tokens; an LSUN-like level.
CORE = [("cifar b{B}", B, 1, 256, 256) for B in (1, 64, 256)] + [("lsun-like b8", 8, 4, 1024, 128)]
QUICK_CORE = [("cifar b{B}", B, 1, 256, 256) for B in (1, 8)]
BLOCK = [(B, 256, 16) for B in (1, 64, 256)]  # (batch, channels, side)
QUICK_BLOCK = [(1, 256, 16), (8, 256, 16)]


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return []
    return [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("math", SDPBackend.MATH)], sdpa_kernel


def cases(op: str, device: torch.device, quick: bool) -> Iterator[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends, sdpa_kernel = _sdpa_backends() or ([], None)
    for label, B, H, L, d in (QUICK_CORE if quick else CORE):
        q, k, v = (torch.randn(B, H, L, d, device=device, dtype=dtype) for _ in range(3))
        e = q.element_size()
        common = dict(op="attention", size=label.format(B=B), numel=q.numel(), dtype=dtype,
                      bytes=4 * q.numel() * e, flops=4 * B * H * L * L * d)
        for backend in kernel_backends("attention", device):
            yield Case(impl=f"ddpm_fast[{backend}]", fn=lambda q=q, k=k, v=v, b=backend: ops.attention(
                q, k, v, backend=b), baseline=False, **common)
        for name, sdp in backends:
            try:
                with sdpa_kernel(sdp):
                    F.scaled_dot_product_attention(q[:1, :1, :16], k[:1, :1, :16], v[:1, :1, :16])
            except RuntimeError:
                continue  # this SDPA backend cannot run here (device, dtype or d)

            def run(q=q, k=k, v=v, sdp=sdp):
                with sdpa_kernel(sdp):
                    return F.scaled_dot_product_attention(q, k, v)
            yield Case(impl=f"SDPA {name}", fn=run, baseline=True, **common)
    yield from _block_cases(device, dtype, quick)


def _block_cases(device, dtype, quick):
    if optional("diffusers") is None:
        return
    from diffusers.models.attention_processor import Attention

    from ..modules import FusedAttnProcessor

    for B, C, S in (QUICK_BLOCK if quick else BLOCK):
        attn = Attention(C, heads=1, dim_head=C, norm_num_groups=32, eps=1e-6, residual_connection=True, bias=True,
                         upcast_softmax=True, _from_deprecated_attn_block=True).to(device, dtype).eval()
        fused = Attention(C, heads=1, dim_head=C, norm_num_groups=32, eps=1e-6, residual_connection=True, bias=True,
                          upcast_softmax=True, _from_deprecated_attn_block=True).to(device, dtype).eval()
        fused.load_state_dict(attn.state_dict())
        fused.set_processor(FusedAttnProcessor())
        x = torch.randn(B, C, S, S, device=device, dtype=dtype)
        params = [attn.group_norm.weight, attn.group_norm.bias, attn.to_q.weight, attn.to_q.bias, attn.to_k.weight,
                  attn.to_k.bias, attn.to_v.weight, attn.to_v.bias, attn.to_out[0].weight, attn.to_out[0].bias]
        compiled = try_build(lambda: torch.compile(lambda x: ref.attention_block(x, *params, num_groups=32, eps=1e-6),
                                                   dynamic=False))
        L = S * S
        common = dict(op="attention block", size=f"b{B} {C}ch@{S}x{S}", numel=x.numel(), dtype=dtype,
                      bytes=2 * x.numel() * x.element_size(), flops=B * (8 * L * C * C + 4 * L * L * C))
        with torch.no_grad():
            yield Case(impl="ddpm_fast fused block", fn=lambda x=x, m=fused: _nograd(m, x), baseline=False, **common)
            yield Case(impl="diffusers eager block", fn=lambda x=x, m=attn: _nograd(m, x), baseline=True, **common)
            yield Case(impl="torch.compile(reference block)", fn=lambda x=x, c=compiled: _nograd(c, x), baseline=True,
                       **common)


def _nograd(f, x):
    with torch.no_grad():
        return f(x)
