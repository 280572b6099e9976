"""End-to-end sampling: the DDPM CIFAR-10 U-Net (35.7M parameters, 12.1 GFLOP per image per step)
with random weights, timed over a number of steps and reported per step and as images/s for the
full 1000 steps (every step costs the same: one U-Net call and one update).

Parallel-in-time rows (size "bN parallel", batch 1 and 8): the sequential DDPMSampler (CUDA graphs on
CUDA; the baseline) against ParallelConfig windows of 16, 32 and 64 steps at tol 0.1, each running
all its steps, with rounds and model evaluations per image and the largest pixel difference from
the sequential images.

Variants: diffusers' DDPMPipeline in fp32 and under bf16 autocast, torch.compile(max-autotune) of
its UNet (GPU only), FastDDPMScheduler alone, accelerate() + FastDDPMScheduler (these four need
diffusers), and DDPMSampler in fp32 and bf16 with CUDA graphs on and off, and with graphs in
channels_last (graphs and channels_last on CUDA only).
MFU = achieved FLOP/s over the matmul floor of the row's dtype, measured in the same run.
The samplers keep their CUDA graphs across calls (keep_graphs): a timed call replays them, as the
steps of a 1000-step run do after its one capture per batch shape, which a call of a few steps
timed whole would count many times over.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch

from .diffusion import Case
from .harness import optional, try_build

GFLOP_PER_IMAGE_STEP = 12.1
PARALLEL_WINDOWS = (16, 32, 64)
PARALLEL_TOL = 0.1
FULL_STEPS = 1000
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
               norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


def plan(device: torch.device, quick: bool):
    """(batch sizes, steps timed per call): a few hundred steps on a GPU; on a 2-core CPU one U-Net
    call takes seconds, so few steps and small batches."""
    if device.type == "cuda":  # batch 1 and 256: the targets' sizes (latency, and throughput)
        return ([1, 256] if quick else [1, 64, 256]), (20 if quick else 200)
    return ([1] if quick else [1, 8]), (2 if quick else 3)


def cases(op: str, device: torch.device, quick: bool) -> Iterator[Case]:
    """The DDPMSampler rows always; the rows that run a diffusers pipeline only where diffusers imports."""
    from .. import DDPMSampler, accelerate
    from ..models import DDPMUNet

    diffusers = optional("diffusers")
    torch.manual_seed(0)
    # What DDPMUNet.from_diffusers makes of CIFAR10, built without diffusers (random weights either way).
    ours = DDPMUNet.cifar10(dropout=0.0).to(device)
    if diffusers is not None:
        from ..diffusers import FastDDPMScheduler

        unet = diffusers.UNet2DModel(**CIFAR10).to(device).eval()
    batches, steps = plan(device, quick)

    def pipeline(model, scheduler_cls, batch, autocast=None):
        pipe = diffusers.DDPMPipeline(unet=model, scheduler=scheduler_cls())
        pipe.set_progress_bar_config(disable=True)

        def run():
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
                     output_type="np")
        return run

    def compiled(model):
        model = copy.deepcopy(model)
        model.forward = torch.compile(model.forward, mode="max-autotune")
        return model

    autotuned = []
    for batch in batches:
        common = dict(op=op, size=f"b{batch}", numel=batch * 3 * 32 * 32, dtype=torch.float32, bytes=0,
                      flops=int(GFLOP_PER_IMAGE_STEP * 1e9 * batch * steps), steps=steps, images=batch)
        bf16 = dict(common, dtype=torch.bfloat16)  # rows that run their matmuls in bf16: MFU against its floor
        # On CUDA also channels_last, the layout train.py uses on a GPU: cuDNN's tensor-core convolutions
        # work in NHWC, so NCHW may cost transposes; which layout is faster is the record's to say.
        layouts = [(False, False), (True, False), (True, True)] if device.type == "cuda" else [(False, False)]
        for dtype in (torch.float32, torch.bfloat16):
            for graphs, channels_last in layouts:
                # channels_last turns the module's weights: a copy, so the other rows keep NCHW
                sampler = try_build(lambda: DDPMSampler(copy.deepcopy(ours) if channels_last else ours, dtype=dtype,
                                                        cuda_graphs=graphs, channels_last=channels_last,
                                                        device=device, keep_graphs=True).sample)
                name = f"DDPMSampler {str(dtype)[6:]}" + (" graphs" if graphs else "") + (
                    " channels_last" if channels_last else "")
                yield Case(impl=name, fn=lambda s=sampler, b=batch: s(b, seed=0, num_steps=steps),
                           baseline=False, **dict(common, dtype=dtype))
        if diffusers is not None:
            yield Case(impl="diffusers DDPMPipeline fp32",
                       fn=try_build(lambda: pipeline(unet, diffusers.DDPMScheduler, batch)), baseline=True, **common)
            yield Case(impl="diffusers DDPMPipeline bf16 autocast",
                       fn=try_build(lambda: pipeline(unet, diffusers.DDPMScheduler, batch, torch.bfloat16)),
                       baseline=True, **bf16)
            yield Case(impl="FastDDPMScheduler", fn=try_build(lambda: pipeline(unet, FastDDPMScheduler, batch)),
                       baseline=False, **common)
            yield Case(impl="accelerate + FastDDPMScheduler",
                       fn=try_build(lambda: pipeline(accelerate(copy.deepcopy(unet)), FastDDPMScheduler, batch)),
                       baseline=False, **common)
            if device.type == "cuda":
                autotuned.append(Case(impl="diffusers + torch.compile(max-autotune) bf16",
                                      fn=try_build(lambda: pipeline(compiled(unet), diffusers.DDPMScheduler, batch,
                                                                    torch.bfloat16)), baseline=True, **bf16))
    yield from parallel_cases(op, device, ours, steps)
    # Last, the largest batch first (the throughput target's): max-autotune compiles for minutes (the
    # H200's --quick run of 2026-12-04 was cut off inside the first), so a run cut short keeps the rest.
    yield from reversed(autotuned)


def parallel_cases(op: str, device: torch.device, model, steps: int) -> Iterator[Case]:
    """Sequential vs parallel-in-time sampling of the same images (seed 0) at batch 1 and 8."""
    from .. import DDPMSampler, ParallelConfig

    graphs = device.type == "cuda"
    for batch in (1, 8):
        common = dict(op=op, size=f"b{batch} parallel", numel=batch * 3 * 32 * 32, dtype=torch.float32, bytes=0,
                      flops=int(GFLOP_PER_IMAGE_STEP * 1e9 * batch * steps), steps=steps, images=batch)
        seq = try_build(lambda: DDPMSampler(model, cuda_graphs=graphs, device=device, keep_graphs=True).sample)
        images = {}

        def sequential(s=seq, b=batch):
            images[b] = s(b, seed=0, num_steps=steps)
            return images[b]

        yield Case(impl="DDPMSampler fp32" + (" graphs" if graphs else "") + " sequential", fn=sequential,
                   baseline=True, report=lambda: dict(rounds_per_image=float(steps), evals_per_image=float(steps),
                                                      max_err_vs_sequential=0.0), **common)
        for window in PARALLEL_WINDOWS:
            par = try_build(lambda: DDPMSampler(model, cuda_graphs=graphs, device=device, keep_graphs=True,
                                                parallel=ParallelConfig(window=window, tol=PARALLEL_TOL)).sample)
            out = {}

            def run(p=par, b=batch, o=out):
                o["images"] = p(b, seed=0, num_steps=steps)
                return o["images"]

            def report(p=par, b=batch, o=out, seq_fn=sequential):
                want = images[b] if b in images else seq_fn()
                st = p.__self__.parallel_stats
                return dict(rounds_per_image=st.rounds.float().mean().item(),
                            evals_per_image=st.evaluations.float().mean().item(),
                            max_err_vs_sequential=(o["images"] - want).abs().max().item(),
                            flops=int(GFLOP_PER_IMAGE_STEP * 1e9 * int(st.evaluations.sum())))

            yield Case(impl=f"DDPMSampler fp32 parallel window {window} tol {PARALLEL_TOL}", fn=run, baseline=False,
                       report=report, **common)
