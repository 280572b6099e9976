"""Each op's kernels side by side, in every dtype they take: the record that backend="auto"'s order
(ops.KERNELS) is read from.  One sampling-sized and one large shape per op (the first alone in
--quick), no baselines: the per-op suites measure those.  Rows are op "backends", sized
"<op> <dtype> <shape>"; bench/targets.py turns them into the choice per op and dtype.

picard_step is left out: its cost is the window's model calls, not the update.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .. import ops
from ..schedule import NoiseSchedule
from .diffusion import P_STEP_FLOPS, Q_SAMPLE_FLOPS, T_BENCH, Case, kernel_backends
from .group_norm import EPS, FLOPS_PER_ELEMENT, G

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = {
    "philox_randn": [(256, 3, 32, 32), (64, 3, 256, 256)],
    "q_sample": [(256, 3, 32, 32), (64, 3, 256, 256)],
    "p_step": [(256, 3, 32, 32), (64, 3, 256, 256)],
    "group_norm": [(256, 128, 32, 32), (64, 256, 8, 8)],  # the CIFAR U-Net's first and third levels
    "attention": [(64, 1, 256, 256), (8, 4, 1024, 128)],  # [B, heads, L, d]: CIFAR's 16x16 level, an LSUN-like one
}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _call(op: str, shape, dtype: torch.dtype, device: torch.device, sched: NoiseSchedule):
    """(fn(backend), bytes, flops) of one call of op at shape."""
    x = torch.randn(shape, device=device, dtype=dtype)
    n, e = x.numel(), x.element_size()
    if op == "philox_randn":
        return (lambda b: ops.philox_randn(shape, 0, t=T_BENCH, device=device, dtype=dtype, backend=b)), n * e, 0
    if op == "q_sample":
        return (lambda b: ops.q_sample(x, T_BENCH, sched, seed=0, backend=b)), 2 * n * e, Q_SAMPLE_FLOPS * n
    if op == "p_step":
        out = torch.randn_like(x)
        return (lambda b: ops.p_step(x, out, T_BENCH, sched, seed=0, backend=b)), 3 * n * e, P_STEP_FLOPS * n
    if op == "group_norm":
        w, bias = torch.randn(shape[1], device=device, dtype=dtype), torch.randn(shape[1], device=device, dtype=dtype)
        return ((lambda b: ops.group_norm(x, G, w, bias, EPS, silu=True, backend=b)), 2 * n * e,
                FLOPS_PER_ELEMENT * n)
    if op == "attention":
        k, v = torch.randn_like(x), torch.randn_like(x)
        B, H, L, d = shape
        return (lambda b: ops.attention(x, k, v, backend=b)), 4 * n * e, 4 * B * H * L * L * d
    raise ValueError(f"op: no backends benchmark for {op!r}")


def cases(op: str, device: torch.device, quick: bool) -> Iterator[Case]:
    sched = NoiseSchedule.linear(1000)
    for name, shapes in SHAPES.items():
        for shape in shapes[:1] if quick else shapes:
            for dtype in DTYPES:
                fn, n_bytes, flops = _call(name, shape, dtype, device, sched)
                size = f"{name} {SHORT[dtype]} {'x'.join(map(str, shape))}"
                probe = torch.empty(1, 1, 1, shape[-1], device=device, dtype=dtype)
                for backend in kernel_backends(name, device):
                    if name == "attention" and backend != "auto" and ops._attention_refusal(backend, probe):
                        continue  # this kernel does not take the dtype (the CUDA one: fp16/bf16 only)
                    yield Case(op=op, size=size, impl=f"ddpm_fast[{backend}]", fn=lambda f=fn, b=backend: f(b),
                               numel=int(torch.Size(shape).numel()), dtype=dtype, bytes=n_bytes, flops=flops,
                               baseline=False)
