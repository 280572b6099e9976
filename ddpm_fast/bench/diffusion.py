"""Benchmark cases for q_sample and p_step against what users would otherwise run:
diffusers' add_noise / DDPMScheduler.step, the reference in eager mode (noise from
torch.randn), and torch.compile of the reference with torch.randn inside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from .. import ops
from .. import reference as ref
from ..schedule import NoiseSchedule
from .harness import optional, try_build

SIZES: List[Tuple[str, Tuple[int, ...]]] = [
    ("1x3x32x32", (1, 3, 32, 32)),
    ("64x3x32x32", (64, 3, 32, 32)),
    ("256x3x32x32", (256, 3, 32, 32)),
    ("64x3x256x256", (64, 3, 256, 256)),
    ("16x4x512x512", (16, 4, 512, 512)),  # 16.8M elements
]
QUICK_SIZES = [SIZES[0], SIZES[2]]
T_BENCH = 500
# Arithmetic per element, noise generation excluded: p_step's x0, clip, posterior mean and
# sigma*z (~12 FLOPs); q_sample's two multiplies and an add.
P_STEP_FLOPS, Q_SAMPLE_FLOPS = 12, 3


@dataclass
class Case:
    op: str
    size: str
    impl: str
    fn: Callable[[], object]
    numel: int
    dtype: torch.dtype
    bytes: int
    flops: int
    baseline: bool
    steps: int = 0  # end-to-end cases: sampling steps per call, and images per call
    images: int = 0
    # Parallel-sampling cases: called after timing, the Row fields it measures (rounds, evaluations, error).
    report: Optional[Callable[[], dict]] = None


def kernel_backends(op: str, device: torch.device) -> List[str]:
    """The backends with a kernel for op that run on this device ("auto" when none does)."""
    status = ops.available_backends()
    here = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    found = [b for b in here if b in ops.KERNELS[op] and status[b] is True]
    return found or ["auto"]


def sizes(device: torch.device, quick: bool) -> List[Tuple[str, Tuple[int, ...]]]:
    """The shapes timed: on a GPU a quick run also takes the 16.8M-element one, where the bandwidth
    targets are judged (it costs a GPU well under a millisecond a call)."""
    if not quick:
        return SIZES
    return QUICK_SIZES + ([SIZES[-1]] if device.type == "cuda" else [])


def _compiled(fn):
    return try_build(lambda: torch.compile(fn, dynamic=True))


def cases(op: str, device: torch.device, quick: bool, dtype: torch.dtype = torch.float32) -> Iterator[Case]:
    sched = NoiseSchedule.linear(1000)
    diffusers = optional("diffusers")
    dsched = diffusers.DDPMScheduler() if diffusers else None
    if dsched is not None:
        dsched.alphas_cumprod = dsched.alphas_cumprod.to(device)  # as a pipeline on this device holds it
    compiled_step = _compiled(lambda x, o: ref.p_step(x, o, T_BENCH, sched, noise=torch.randn_like(x)))
    compiled_q = _compiled(lambda x0: ref.q_sample(x0, T_BENCH, sched, noise=torch.randn_like(x0)))
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    for label, shape in sizes(device, quick):
        x = torch.randn(shape, device=device, dtype=dtype)
        n, e = x.numel(), x.element_size()
        t_vec = torch.full((shape[0],), T_BENCH, device=device, dtype=torch.long)
        if op == "p_step":
            out = torch.randn(shape, device=device, dtype=dtype)
            common = dict(op=op, size=label, numel=n, dtype=dtype, bytes=3 * n * e, flops=P_STEP_FLOPS * n)
            for backend in kernel_backends("p_step", device):
                yield Case(impl=f"ddpm_fast[{backend}]", fn=lambda x=x, out=out, b=backend: ops.p_step(
                    x, out, T_BENCH, sched, seed=0, backend=b), baseline=False, **common)
            yield Case(impl="reference eager", fn=lambda x=x, out=out: ref.p_step(
                x, out, T_BENCH, sched, noise=torch.randn_like(x)), baseline=True, **common)
            yield Case(impl="torch.compile(reference)", fn=lambda x=x, out=out: compiled_step(x, out),
                       baseline=True, **common)
            if dsched is not None:
                yield Case(impl="diffusers step", fn=lambda x=x, out=out: dsched.step(
                    out, T_BENCH, x, generator=gen).prev_sample, baseline=True, **common)
        elif op == "q_sample":
            common = dict(op=op, size=label, numel=n, dtype=dtype, bytes=2 * n * e, flops=Q_SAMPLE_FLOPS * n)
            for backend in kernel_backends("q_sample", device):
                yield Case(impl=f"ddpm_fast[{backend}]", fn=lambda x=x, b=backend: ops.q_sample(
                    x, T_BENCH, sched, seed=0, backend=b), baseline=False, **common)
            yield Case(impl="reference eager", fn=lambda x=x: ref.q_sample(
                x, T_BENCH, sched, noise=torch.randn_like(x)), baseline=True, **common)
            yield Case(impl="torch.compile(reference)", fn=lambda x=x: compiled_q(x), baseline=True, **common)
            if dsched is not None:
                yield Case(impl="diffusers add_noise", fn=lambda x=x, t=t_vec: dsched.add_noise(
                    x, torch.randn_like(x), t), baseline=True, **common)
        else:
            raise ValueError(f"op: no diffusion benchmark named {op!r}")
