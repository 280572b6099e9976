"""ddpm-fast command line: info, sample, train, bench.  `torchrun --nproc_per_node=N -m ddpm_fast sample`
shards the images over processes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import List, Optional

import torch


def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, _ext, available_backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "ddpm_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension": _ext.BUILD_INFO or f"not built ({_ext.IMPORT_ERROR})",
        "backends": available_backends(),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, dict):
                print(f"{k:{width}}  " + ", ".join(f"{a}={b}" for a, b in v.items()))
            else:
                print(f"{k:{width}}  {v}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import SUITES, run

    only = [o.strip() for o in args.only.split(",")] if args.only else None
    if only:
        bad = [o for o in only if o not in SUITES]
        if bad:
            print(f"ddpm-fast bench: error: --only: unknown benchmark {bad[0]!r}; choose from {', '.join(SUITES)}",
                  file=sys.stderr)
            return 2
    result = run(only, quick=args.quick, out_dir=args.out, device=args.device,
                 command="ddpm-fast " + " ".join(sys.argv[1:]))
    return 1 if any(r.status != "ok" for r in result["rows"]) else 0


# The embedded default model's architecture: a small DDPM U-Net for 16x16 digits.
DIGITS_UNET = dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                   dropout=0.0, image_size=16, num_groups=8)


def cmd_train(args: argparse.Namespace) -> int:
    from . import NoiseSchedule
    from .data import load_digits
    from .models import DDPMUNet
    from .train import train

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.access(out_dir, os.W_OK):
        print(f"ddpm-fast train: error: --out: cannot write to {out_dir}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    images, _ = load_digits()
    net = DDPMUNet(**DIGITS_UNET)
    schedule = NoiseSchedule.linear(args.timesteps)
    print(f"training a {sum(p.numel() for p in net.parameters()):,}-parameter U-Net on {len(images)} digits, "
          f"{args.steps} steps of {args.batch_size}")
    ema = train(net, images, schedule, args.steps, args.batch_size, args.lr, seed=args.seed)
    ema.save(args.out, schedule, sampling=dict(prediction="epsilon", variance="fixed_small", clip_sample=True),
             data="sklearn digits 8x8 upscaled to 16x16", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
             seed=args.seed)
    print(f"wrote {args.out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .io import image_grid, load_for_sampling, save_png
    from .sampler import DDPMSampler, to_uint8

    def fail(msg: str) -> int:
        print(f"ddpm-fast sample: error: {msg}", file=sys.stderr)
        return 2

    if args.num <= 0:
        return fail(f"--num-images: expected a positive number of images, got {args.num}")
    if args.batch_size <= 0:
        return fail(f"--batch-size: expected a positive int, got {args.batch_size}")
    parallel = None
    if args.parallel_window is not None:
        from .parallel import ParallelConfig

        if args.parallel_window <= 0:
            return fail(f"--parallel-window: expected a positive number of steps, got {args.parallel_window}")
        tol = 0.1 if args.parallel_tol is None else args.parallel_tol
        if not 0 <= tol < float("inf"):
            return fail(f"--parallel-tol: expected a finite number >= 0, got {args.parallel_tol}")
        parallel = ParallelConfig(window=args.parallel_window, tol=tol)
    elif args.parallel_tol is not None:
        return fail("--parallel-tol: needs --parallel-window")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        return fail(f"--out: cannot create {args.out!r} ({e.strerror})")
    if not os.access(args.out, os.W_OK):
        return fail(f"--out: {args.out!r} is not writable")
    try:
        model, schedule, options = load_for_sampling(args.model)
    except (FileNotFoundError, ValueError, TypeError) as e:
        return fail(str(e))

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model = model.to(device)
    try:
        sampler = DDPMSampler(model, schedule, backend=args.backend, dtype=args.dtype, device=device,
                              cuda_graphs=False if args.no_graphs else None, parallel=parallel, **options)
        # Contiguous shards of the global indices: image i is the same whichever rank draws it.
        per = -(-args.num // world)
        start, count = rank * per, max(0, min(per, args.num - rank * per))
        steps = args.steps or schedule.num_timesteps
        t0 = time.perf_counter()
        images = sampler.sample(count, seed=args.seed, batch_size=args.batch_size, num_steps=args.steps,
                                start_index=start, progress=args.progress) if count else None
        elapsed = time.perf_counter() - t0
    except ValueError as e:
        return fail(str(e))
    shard = to_uint8(images) if images is not None else None
    if world > 1:
        import torch.distributed as dist

        shards = [None] * world
        dist.all_gather_object(shards, shard)
        dist.destroy_process_group()
        if rank != 0:
            return 0
        shard = torch.cat([s for s in shards if s is not None])
    np.savez(os.path.join(args.out, "samples.npz"), shard.numpy())
    grid_path = os.path.join(args.out, "grid.png")
    save_png(image_grid(shard[:64]), grid_path, scale=max(1, 512 // (shard.shape[1] * 8)))
    ms_per_step = 1e3 * elapsed / steps
    print(f"{args.num} images, {steps} steps, {world} process(es) on {device}: {count / elapsed:.2f} images/s per "
          f"process, {ms_per_step:.2f} ms per step (batch {min(args.batch_size, max(count, 1))})")
    print(f"wrote {os.path.join(args.out, 'samples.npz')} (uint8 NHWC) and {grid_path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm-fast", description="Fast DDPM kernels and sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which backends can run here")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark the ops against eager, torch.compile and diffusers",
                           description="Benchmark the ops against eager, torch.compile and diffusers. Exit status 1 "
                           "when a case failed (its row in the results says why), after writing the results.")
    bench.add_argument("--quick", action="store_true", help="two sizes, short timing (under 2 minutes on 2 CPU cores)")
    bench.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    bench.add_argument("--out", default="bench-results",
                       help="directory for the JSON/Markdown/PNG results (default: ./bench-results)")
    bench.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    bench.set_defaults(func=cmd_bench)
    sa = sub.add_parser("sample", help="sample images (default: the embedded digits model)")
    sa.add_argument("--model", help="our checkpoint file or a diffusers UNet2DModel / pipeline directory")
    # --num-images first: under torchrun, "--num" alone is taken for an abbreviation of its --numa-binding
    sa.add_argument("--num-images", "--num", dest="num", type=int, default=64, help="number of images")
    sa.add_argument("--batch-size", type=int, default=64)
    sa.add_argument("--steps", type=int, help="respace to this many steps (default: all)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", default="samples", help="directory for samples.npz and grid.png")
    sa.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sa.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda", "triton"])
    sa.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    sa.add_argument("--no-graphs", action="store_true", help="do not capture CUDA graphs")
    sa.add_argument("--progress", action="store_true", help="show a progress bar")
    sa.add_argument("--parallel-window", type=int, help="parallel-in-time sampling: refine this many steps at once "
                    "(Picard iterations; the images stay within the tolerance of the sequential ones)")
    sa.add_argument("--parallel-tol", type=float, help="convergence tolerance of --parallel-window (default 0.1)")
    sa.set_defaults(func=cmd_sample)
    tr = sub.add_parser("train", help="train the default digits model (fused q_sample, Philox noise)")
    tr.add_argument("--out", default="digits16.pt", help="checkpoint file to write")
    tr.add_argument("--steps", type=int, default=4000)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--timesteps", type=int, default=1000)
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
