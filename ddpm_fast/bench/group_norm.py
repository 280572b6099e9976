"""Benchmark cases for the GroupNorm family (the U-Net's norm1/norm2).

- group_norm: GroupNorm + SiLU forward, the fused kernels against eager F.silu(F.group_norm(x)) and
  torch.compile of it.  Bytes: one read + one write of x when fused.
- group_norm_train: forward + backward of ResBlock's norm2, SiLU(GroupNorm(x + temb)) with weight
  and bias, gradients in x, weight, bias and temb, against the same composition in eager PyTorch
  and under torch.compile.  Bytes: forward reads x and writes y, backward reads x and dy and
  writes dx: 5 N sizeof(T) (the floor when each is touched once).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import ops
from .diffusion import Case, kernel_backends
from .harness import try_build

# (label, C, H) at 32 groups: the DDPM CIFAR-10 U-Net's levels, and a 256x256 model's first level.
LEVELS = [("128ch@32x32", 128, 32), ("256ch@16x16", 256, 16), ("256ch@8x8", 256, 8), ("256ch@4x4", 256, 4)]
BATCHES = [1, 64, 256]
QUICK = [(b, lvl, False) for b in (1, 64) for lvl in (LEVELS[0], LEVELS[2])]
# channels_last inputs (what a channels_last model feeds its norms), at the CIFAR levels that differ most.
CHANNELS_LAST = [(1, LEVELS[0]), (64, LEVELS[0]), (64, LEVELS[2])]
G, EPS = 32, 1e-6
FLOPS_PER_ELEMENT = 8  # statistics (3), normalise + affine (3), SiLU (~2 + exp)


def shapes(quick: bool):
    """(batch, level, channels_last) triples."""
    if quick:
        return QUICK
    return ([(b, lvl, False) for b in BATCHES for lvl in LEVELS] + [(8, ("512ch@64x64", 512, 64), False)]
            + [(b, lvl, True) for b, lvl in CHANNELS_LAST])


def cases(op: str, device: torch.device, quick: bool) -> Iterator[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    eager = lambda x, w, b: F.silu(F.group_norm(x, G, w, b, EPS))  # noqa: E731
    compiled = try_build(lambda: torch.compile(eager, dynamic=False))
    for B, (label, C, H), channels_last in shapes(quick):
        x = torch.randn(B, C, H, H, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            label += " channels_last"
        w = torch.randn(C, device=device, dtype=dtype)
        b = torch.randn(C, device=device, dtype=dtype)
        n = x.numel()
        common = dict(op=op, size=f"{B}x{label}", numel=n, dtype=dtype, bytes=2 * n * x.element_size(),
                      flops=FLOPS_PER_ELEMENT * n)
        for backend in kernel_backends("group_norm", device):
            yield Case(impl=f"ddpm_fast[{backend}]", fn=lambda x=x, w=w, b=b, be=backend: ops.group_norm(
                x, G, w, b, EPS, silu=True, backend=be), baseline=False, **common)
        yield Case(impl="eager GN+SiLU", fn=lambda x=x, w=w, b=b: eager(x, w, b), baseline=True, **common)
        yield Case(impl="torch.compile(GN+SiLU)", fn=lambda x=x, w=w, b=b: compiled(x, w, b), baseline=True,
                   **common)


# fwd+bwd: the CIFAR U-Net's levels at the training batch (64 on CPU; 128 on GPU, the paper's).
TRAIN_LEVELS = [LEVELS[0], LEVELS[1], LEVELS[2]]
TRAIN_FLOPS_PER_ELEMENT = 30  # forward ~8, backward two passes of ~10 plus SiLU's derivative


def _norm2_eager(x, w, b, temb):
    return F.silu(F.group_norm(x + temb[:, :, None, None], G, w, b, EPS))


def _norm2_ours(backend):
    return lambda x, w, b, temb: ops.group_norm(x, G, w, b, EPS, add=temb, silu=True, backend=backend)


def _fwd_bwd(f, leaves, dy):
    def run():
        return torch.autograd.grad(f(*leaves), leaves, dy)

    return run


def train_cases(op: str, device: torch.device, quick: bool) -> Iterator[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = 128 if device.type == "cuda" else 64
    compiled = try_build(lambda: torch.compile(_norm2_eager, dynamic=False))
    levels = TRAIN_LEVELS[:2] if quick else TRAIN_LEVELS
    for (label, C, H), channels_last in [(lvl, False) for lvl in levels] + [(TRAIN_LEVELS[0], True)]:
        x = torch.randn(batch, C, H, H, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            label += " channels_last"
        leaves = [x.requires_grad_(), torch.randn(C, device=device, dtype=dtype).requires_grad_(),
                  torch.randn(C, device=device, dtype=dtype).requires_grad_(),
                  torch.randn(batch, C, device=device, dtype=dtype).requires_grad_()]
        dy = torch.randn_like(x)
        n = x.numel()
        common = dict(op=op, size=f"{batch}x{label}", numel=n, dtype=dtype, bytes=5 * n * x.element_size(),
                      flops=TRAIN_FLOPS_PER_ELEMENT * n)
        for backend in kernel_backends("group_norm", device):
            yield Case(impl=f"ddpm_fast[{backend}] fwd+bwd", fn=_fwd_bwd(_norm2_ours(backend), leaves, dy),
                       baseline=False, **common)
        yield Case(impl="eager fwd+bwd", fn=_fwd_bwd(_norm2_eager, leaves, dy), baseline=True, **common)
        yield Case(impl="torch.compile fwd+bwd", fn=_fwd_bwd(compiled, leaves, dy), baseline=True, **common)
