"""Training step: the DDPM CIFAR-10 U-Net (35.7M parameters) with random weights, one step of
forward + backward + Adam on a batch of 32x32 images, as its training script runs it.

Baselines (diffusers' UNet2DModel of the same architecture, the loss a diffusers training script
computes: torch.randn noise, DDPMScheduler.add_noise, mse_loss, torch's default Adam): eager fp32,
eager under bf16 autocast, and torch.compile of the same model (fp32, and bf16 on a GPU).  Ours:
DDPMUNet.from_diffusers of the same weights, accelerate(), ddpm_fast.losses.eps_mse (fused q_sample
with in-kernel noise) and Adam as `ddpm-fast train` runs it (fused on a GPU), fp32 and bf16.

A step is taken as 3x the forward's 12.1 GFLOP per image (the backward costs about twice the
forward); MFU = that over the matmul floor measured in the same run.  The paper's batch is 128; on
a 2-core CPU that takes minutes per step, so the CPU runs a small batch and the row says so.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .diffusion import Case
from .e2e import CIFAR10, GFLOP_PER_IMAGE_STEP
from .harness import optional, try_build

PAPER_BATCH = 128
FLOP_PER_IMAGE = 3 * GFLOP_PER_IMAGE_STEP * 1e9


def batch_size(device: torch.device, quick: bool) -> int:
    if device.type == "cuda":
        return PAPER_BATCH
    return 2 if quick else 8


def step(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, int], torch.Tensor], device: torch.device,
         bf16: bool, fused_adam: bool = False) -> Callable[[], None]:
    """One training step per call: loss under autocast, backward, Adam."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused_adam or None)
    count = [0]

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, count[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        count[0] += 1
    return run


def cases(op: str, device: torch.device, quick: bool) -> Iterator[Case]:
    """The baseline rows need diffusers; ours run without it, on DDPMUNet.cifar10()."""
    from .. import NoiseSchedule, accelerate
    from ..losses import eps_mse
    from ..models import DDPMUNet

    diffusers = optional("diffusers")
    torch.manual_seed(0)
    B = batch_size(device, quick)
    x0 = torch.rand(B, 3, 32, 32, device=device) * 2 - 1
    t = torch.randint(0, 1000, (B,), device=device)
    tables = NoiseSchedule.linear(1000).to(device)
    size = f"b{B}" + ("" if B == PAPER_BATCH else f" (CPU; paper: b{PAPER_BATCH})")
    common = dict(op=op, size=size, numel=x0.numel(), dtype=torch.float32, bytes=0, flops=int(FLOP_PER_IMAGE * B),
                  steps=1, images=B)
    bf16_row = dict(common, dtype=torch.bfloat16)  # their matmuls run in bf16: MFU against the bf16 floor
    gpu = device.type == "cuda"

    if diffusers is not None:
        unet = diffusers.UNet2DModel(**CIFAR10).to(device)
        scheduler = diffusers.DDPMScheduler()

        def diffusers_loss(model, _):
            noise = torch.randn_like(x0)
            return F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample.float(), noise)

        def baseline(bf16: bool, compiled: bool):
            model = copy.deepcopy(unet)
            return step(torch.compile(model) if compiled else model, diffusers_loss, device, bf16)

        yield Case(impl="eager fp32", fn=try_build(lambda: baseline(False, False)), baseline=True, **common)
        yield Case(impl="eager bf16 autocast", fn=try_build(lambda: baseline(True, False)), baseline=True,
                   **bf16_row)
        yield Case(impl="torch.compile fp32", fn=try_build(lambda: baseline(False, True)), baseline=True, **common)
        if gpu:
            yield Case(impl="torch.compile bf16 autocast", fn=try_build(lambda: baseline(True, True)), baseline=True,
                       **bf16_row)

    layout = torch.channels_last if gpu else torch.contiguous_format  # as `ddpm-fast train` runs
    x0_ours = x0.contiguous(memory_format=layout)

    def ours(bf16: bool):
        model = DDPMUNet.from_diffusers(unet) if diffusers is not None else DDPMUNet.cifar10(dropout=0.0)
        model = accelerate(model.to(device, memory_format=layout))
        return step(model, lambda m, k: eps_mse(m, x0_ours, t, tables, 0, sample_offset=k * B), device, bf16,
                    fused_adam=gpu)

    adam = " + fused Adam" if gpu else ""
    yield Case(impl=f"ours fp32 (accelerate + eps_mse{adam})", fn=try_build(lambda: ours(False)), baseline=False,
               **common)
    yield Case(impl=f"ours bf16 autocast (accelerate + eps_mse{adam})", fn=try_build(lambda: ours(True)),
               baseline=False, **bf16_row)
