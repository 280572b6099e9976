"""ddpm-fast command line: info, sample, verify, train, bench.  `torchrun --nproc_per_node=N -m ddpm_fast
sample` deals the chunks of a run out over processes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
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


# `train --model` presets: the architecture and the training recipe it comes with.
MODEL_PRESETS = {
    # The embedded default model: a small DDPM U-Net for 16x16 digits.
    "digits16": dict(model=dict(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                attn_resolutions=(8,), dropout=0.0, image_size=16, num_groups=8),
                     recipe=dict(batch_size=64, lr=5e-4, warmup=200, ema_decay=0.999), steps=4000),
    # The paper's CIFAR-10 model (35.7M parameters) and run.
    "cifar10": dict(model=dict(in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                               attn_resolutions=(16,), dropout=0.1, image_size=32),
                    recipe=dict(batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999), steps=800_000),
}
# Arguments that define a run's recipe (ddpm_fast.train.Recipe): a resumed run keeps them, and refuses
# a different value, as it does for --timesteps, --model, --image-size and --data.
RECIPE_ARGS = ("batch_size", "lr", "warmup", "ema_decay", "grad_clip", "seed")


class UsageError(Exception):
    """A mistake in the command line: `ddpm-fast train: error: ...`, exit status 2."""


def train_state_path(out: str) -> str:
    """Where `train --out FILE` keeps the state `--resume` reads: FILE's name with .state before its extension."""
    root, ext = os.path.splitext(out)
    return f"{root}.state{ext or '.pt'}"


def model_config(spec: str, image_size: Optional[int]) -> dict:
    """--model: a preset name, or a JSON file of DDPMUNet arguments or of a diffusers UNet2DModel config
    -> the model's full config."""
    from .models import DDPMUNet
    from .models.loading import config_from_diffusers

    if spec in MODEL_PRESETS:
        cfg = dict(MODEL_PRESETS[spec]["model"])
    elif os.path.isfile(spec):
        try:
            with open(spec) as f:
                cfg = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"--model: cannot read {spec!r} as JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"--model: {spec!r} must hold a JSON object of DDPMUNet arguments")
        if "block_out_channels" in cfg:
            try:
                cfg = config_from_diffusers(cfg)
            except (KeyError, ValueError, TypeError) as e:
                raise UsageError(f"--model: {spec!r}: {e}") from None
    else:
        raise UsageError(f"--model: expected {', '.join(MODEL_PRESETS)} or a JSON config file, got {spec!r}")
    if image_size is not None:
        cfg["image_size"] = image_size
    try:
        return DDPMUNet(**cfg).config
    except (TypeError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None


def _train(args: argparse.Namespace) -> int:
    import dataclasses
    import re

    from . import NoiseSchedule
    from .data import ImageFolder, load_digits
    from .models import DDPMUNet
    from .train import Recipe, atomic_save, load_state, save_sampling_checkpoint, train

    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out_dir} ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--out: cannot write to {out_dir}")
    state_path = train_state_path(args.out)
    for name in ("steps", "checkpoint_every", "log_every", "image_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive int, got {v}")
    if args.workers < 0:
        raise UsageError(f"--workers: expected a non-negative int, got {args.workers}")
    problem = _device_problem(args.device, "auto")
    if problem:
        raise UsageError(problem)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError("train runs in one process: under torchrun every process would train the same run "
                         "into the same --out (use torchrun for sample only)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved = None
    if args.resume:
        try:
            saved = load_state(state_path)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--resume: {str(e).removeprefix('resume: ')}") from None
        meta = saved["meta"]
        for name in RECIPE_ARGS + ("timesteps",):
            given, was = getattr(args, name), (meta["timesteps"] if name == "timesteps" else saved["recipe"][name])
            if given is not None and given != was:
                raise UsageError(f"--{name.replace('_', '-')}: the run being resumed has {was}, got {given}")
        if args.no_flip and saved["recipe"]["flip"]:
            raise UsageError("--no-flip: the run being resumed flips its images")
        data_path = args.data or meta["data_path"]
        cfg = saved["config"]
        if args.model is not None and model_config(args.model, args.image_size or cfg["image_size"]) != cfg:
            raise UsageError(f"--model: the run being resumed trains another model ({cfg})")
        if args.image_size is not None and args.image_size != cfg["image_size"]:
            raise UsageError(f"--image-size: the run being resumed has {cfg['image_size']}, got {args.image_size}")
        recipe = Recipe(**saved["recipe"])
        schedule = NoiseSchedule(saved["betas"])
        steps = meta["steps"] if args.steps is None else args.steps
    else:
        if os.path.exists(state_path):
            raise UsageError(f"--out: {state_path} holds a training run; pass --resume to continue it, "
                             "or remove it to start over")
        data_path = args.data
        spec = args.model or ("cifar10" if data_path else "digits16")
        cfg = model_config(spec, args.image_size)
        preset = MODEL_PRESETS.get(spec, MODEL_PRESETS["cifar10"])
        defaults = dict(preset["recipe"], grad_clip=1.0, seed=0)
        chosen = {k: getattr(args, k) if getattr(args, k) is not None else defaults[k] for k in RECIPE_ARGS}
        try:
            recipe = Recipe(**chosen, flip=bool(data_path) and not args.no_flip)
        except ValueError as e:  # "batch_size: expected ..." -> "--batch-size: expected ..."
            name, message = str(e).split(": ", 1)
            raise UsageError(f"--{name.replace('_', '-')}: {message}") from None
        try:
            schedule = NoiseSchedule.linear(1000 if args.timesteps is None else args.timesteps)
        except ValueError as e:
            raise UsageError(f"--timesteps: {e}") from None
        steps = preset["steps"] if args.steps is None else args.steps

    if data_path:
        try:
            data = ImageFolder(data_path, cfg["image_size"], cfg["in_channels"])
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise UsageError(f"--data: {str(e).removeprefix('data: ')}") from None
        about = f"{len(data)} images under {data_path}"
        fingerprint = data.fingerprint()
    else:
        if cfg["in_channels"] != 1:
            raise UsageError(f"--model: the digits are greyscale, but the model takes {cfg['in_channels']} channels "
                             "(pass --data DIR for your own images)")
        data, _ = load_digits(cfg["image_size"])
        about = f"{len(data)} digits"
        fingerprint = "sklearn digits 8x8 upscaled"
    if saved is not None and saved["meta"]["data"] != fingerprint:
        raise UsageError(f"--data: the run being resumed read {saved['meta']['data']}, this is {fingerprint}")
    if saved is not None and saved["step"] >= steps:
        print(f"{state_path} is at step {saved['step']} already (--steps {steps}); nothing to do")
        return 0

    torch.manual_seed(recipe.seed)
    net = DDPMUNet(**cfg)
    meta = dict(data=fingerprint, data_path=os.path.abspath(data_path) if data_path else None, steps=steps,
                timesteps=schedule.num_timesteps)

    def checkpoint(state: dict, ema: DDPMUNet) -> None:
        atomic_save(state, state_path)
        save_sampling_checkpoint(ema, schedule, args.out, data=fingerprint, step=state["step"],
                                 **dataclasses.asdict(recipe))

    first = saved["step"] if saved is not None else 0
    print(f"training a {sum(p.numel() for p in net.parameters()):,}-parameter U-Net on {about}: steps {first + 1} to "
          f"{steps}, batch {recipe.batch_size}, checkpoints every {args.checkpoint_every} steps to {state_path}")
    progress = sys.stderr.isatty() and not args.no_progress
    try:
        train(net, data, schedule, steps, recipe, device=device, resume=saved, checkpoint=checkpoint,
              checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=progress,
              workers=args.workers, meta=meta)
    except ValueError as e:
        # An unreadable image, found when it is read (a DataLoader worker wraps the message).
        unreadable = re.search(r"data: cannot read image .*", str(e))
        if unreadable:
            raise UsageError(f"--data: {unreadable.group(0).removeprefix('data: ')} (the last checkpoint is kept)") \
                from None
        raise
    print(f"wrote {args.out} (EMA weights, for `ddpm-fast sample --model {args.out}`) and {state_path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    except UsageError as e:
        print(f"ddpm-fast train: error: {e}", file=sys.stderr)
        return 2


def cmd_export(args: argparse.Namespace) -> int:
    from .io import load_for_sampling
    from .models.loading import save_diffusers

    def fail(msg: str) -> int:
        print(f"ddpm-fast export: error: {msg}", file=sys.stderr)
        return 2

    if os.path.isdir(args.dir) and os.listdir(args.dir):
        return fail(f"DIR: {args.dir!r} is not empty")
    try:
        model, schedule, options = load_for_sampling(args.checkpoint)
    except (FileNotFoundError, ValueError, TypeError) as e:
        return fail(str(e).replace("model: ", "CHECKPOINT: ", 1))
    try:
        save_diffusers(model, schedule, options, args.dir)
    except (ValueError, RuntimeError) as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"DIR: cannot write {args.dir!r} ({e.strerror})")
    print(f"wrote {args.dir}: a diffusers DDPMPipeline (DDPMPipeline.from_pretrained), its UNet2DModel in unet/")
    return 0


def _device_problem(device_arg: Optional[str], backend: str) -> Optional[str]:
    """Why --device / --backend cannot run here (one line that says what to do), or None."""
    from . import available_backends

    if device_arg is not None:
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            return f"--device: expected cpu or cuda[:N], got {device_arg!r}"
        if device.type == "cuda":
            if torch.version.cuda is None:
                return (f"--device {device_arg}: this torch is a CPU-only build; install a CUDA build of torch "
                        "on a machine with an NVIDIA GPU, or use --device cpu")
            if not torch.cuda.is_available():
                return (f"--device {device_arg}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                        "run on a machine with an NVIDIA GPU and its driver, or use --device cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                return f"--device {device_arg}: there are {torch.cuda.device_count()} GPU(s) here"
    if backend in ("cuda", "triton"):
        status = available_backends()[backend]
        if status is not True:
            needs = {"cuda": "an NVIDIA GPU and the extension built with CUDA there "
                             "(pip install --no-build-isolation -e .)",
                     "triton": "triton and an NVIDIA GPU, or TRITON_INTERPRET=1 on the CPU"}[backend]
            return f"--backend {backend}: not available here ({status}); it needs {needs}, or use --backend auto"
        on_cpu = (device_arg is not None and torch.device(device_arg).type == "cpu") or not torch.cuda.is_available()
        if on_cpu and (backend == "cuda" or os.environ.get("TRITON_INTERPRET") != "1"):
            return (f"--backend {backend}: runs on a CUDA device, not the CPU"
                    f"{' (or under TRITON_INTERPRET=1)' if backend == 'triton' else ''}; drop --device cpu or use "
                    "--backend auto")
    return None


class _RunProgress:
    """One bar per run on rank 0, over images x steps shown as images: it starts at the chunks done
    before, counts this process's steps as they happen and other processes' chunks as they land."""

    def __init__(self, run, todo: List[int], mine: List[int], steps: int, enabled: bool):
        self.run, self.steps, self.bar, self.polled = run, steps, None, 0.0
        self.others = [k for k in todo if k not in set(mine)]
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: no bar, the run is the same
                return
            self.bar = tqdm(total=run.spec["num_images"] * steps, initial=run.done_images(todo) * steps, unit="img",
                            unit_scale=1 / steps, dynamic_ncols=True, smoothing=0.1,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}, {rate_fmt}]")

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        if self.others and time.monotonic() - self.polled > 1.0:
            self.poll()

    def poll(self) -> None:
        self.polled = time.monotonic()
        landed = [k for k in self.others if self.run.has_chunk(k)]
        for k in landed:
            a, b = self.run.ranges[k]
            self.update((b - a) * self.steps)
        self.others = [k for k in self.others if k not in set(landed)]

    def wait_for_others(self) -> None:
        while self.others:
            time.sleep(0.2)
            self.poll()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_sample(args: argparse.Namespace) -> int:
    from . import __version__, runs
    from .io import DEFAULT_MODEL, load_for_sampling
    from .ops import BackendUnavailableError
    from .sampler import DDPMSampler, to_uint8

    def fail(msg: str) -> int:
        print(f"ddpm-fast sample: error: {msg}", file=sys.stderr)
        return 2

    for name, value in (("--num-images", args.num), ("--batch-size", args.batch_size),
                        ("--chunk-size", args.chunk_size)):
        if value <= 0:
            return fail(f"{name}: expected a positive int, got {value}")
    problem = _device_problem(args.device, args.backend)
    if problem:
        return fail(problem)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        return fail(f"--out: {args.out!r} exists and is not a directory")
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        return fail(f"--out: cannot write to {existing!r}")
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
        model, schedule, options = load_for_sampling(args.model)
    except (FileNotFoundError, ValueError, TypeError) as e:
        return fail(str(e))
    T = schedule.num_timesteps
    steps = T if args.steps is None else args.steps
    if not 1 <= steps <= T:
        return fail(f"--steps: expected an int in [1, {T}], got {steps}")

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            return fail(f"LOCAL_RANK {local}: there are {torch.cuda.device_count()} GPU(s) here, one per process; "
                        "start at most that many per node (torchrun --nproc_per_node), or use --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    try:
        sampler = DDPMSampler(model.to(device), schedule, backend=args.backend, dtype=args.dtype, device=device,
                              cuda_graphs=False if args.no_graphs else None, channels_last=args.channels_last,
                              parallel=parallel,
                              **options)
    except ValueError as e:
        return fail(str(e))
    run = runs.Run(out, runs.manifest(
        model_path=args.model or DEFAULT_MODEL, seed=args.seed, steps=steps, schedule=schedule,
        sampling=sampler.options, dtype=str(sampler.dtype).replace("torch.", ""), sample_shape=sampler.default_shape,
        num_images=args.num, chunk_size=args.chunk_size, version=__version__,
        parallel=None if parallel is None else dict(window=parallel.window, tol=parallel.tol,
                                                    max_iters=parallel.max_iters)))

    # Rank 0 checks or starts the run in out and deals out the chunks still missing; the process group
    # lives only for that: afterwards each process writes its own chunks and rank 0 watches them land.
    created, fresh = not os.path.exists(out), not os.path.exists(os.path.join(out, runs.MANIFEST))
    todo = None
    if rank == 0:
        try:
            todo = run.prepare(restart=args.restart)
        except runs.RunMismatch as e:
            todo = str(e)
        except ValueError as e:  # an unreadable run.json
            todo = f"--out: {e}; --restart starts a new run there"
        except OSError as e:  # a chunk we may not remove, a full disk
            todo = f"--out: cannot write the run in {out!r} ({e})"
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        dist.destroy_process_group()
        todo = box[0]
    if isinstance(todo, str):
        return fail(todo) if rank == 0 else 2
    mine = todo[rank::world]
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = _RunProgress(run, todo, mine, steps, enabled=show and rank == 0) if rank == 0 else None
    computed, t0 = 0, time.perf_counter()
    try:
        with runs.interruptible():
            for k in mine:
                a, b = run.ranges[k]
                images = sampler.sample(b - a, seed=args.seed, batch_size=args.batch_size, num_steps=steps,
                                        start_index=a, progress=progress or False)
                run.write_chunk(k, to_uint8(images).numpy())
                computed += b - a
            elapsed = time.perf_counter() - t0
            if rank != 0:
                return 0
            progress.wait_for_others()
            progress.close()
            digest = run.assemble()
    except runs.Interrupted as e:
        if rank == 0:
            done = sum(run.has_chunk(k) for k in range(len(run.ranges)))
            print(f"ddpm-fast sample: interrupted by {e}: {done} of {len(run.ranges)} chunks are complete in "
                  f"{args.out}; run the same command again to resume", file=sys.stderr)
        return 128 + e.signum
    except runs.ChunkError as e:  # changed on disk after it was written: not a usage error
        print(f"ddpm-fast sample: {e}; run the same command again to compute it anew", file=sys.stderr)
        return 1
    except (ValueError, BackendUnavailableError) as e:
        if rank == 0 and fresh:
            run.discard_if_empty(remove_out=created)
        return fail(str(e))
    finally:
        if progress is not None:
            progress.close()
    work = (f"rank 0 computed {computed}: {computed / elapsed:.2f} images/s, {1e3 * elapsed / steps:.2f} ms per step "
            f"(batch {min(args.batch_size, computed)})" if computed else "nothing left to compute")
    print(f"{args.num} images ({run.done_images(todo)} from earlier runs), {steps} steps, {world} process(es) on "
          f"{device}: {work}")
    print(f"wrote {run.path(runs.SAMPLES)} (uint8 NHWC, sha256 {digest[:16]}...), {run.path(runs.GRID)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import runs

    try:
        checked, problems = runs.verify(args.dir, check_model=not args.skip_model)
    except (FileNotFoundError, ValueError) as e:
        print(f"ddpm-fast verify: error: {e}", file=sys.stderr)
        return 2
    for line in checked:
        print(f"ok: {line}")
    for line in problems:
        print(f"FAILED: {line}")
    return 1 if problems else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm-fast", description="Fast DDPM kernels and sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which backends can run here")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark the ops against eager, torch.compile and diffusers",
                           description="Benchmark the ops against eager, torch.compile and diffusers. Exit status 1 "
                           "when a case failed (its row in the results says why), after writing the results.")
    bench.add_argument("--quick", action="store_true", help="two sizes, short timing (about 85 s on 2 CPU cores)")
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
    sa.add_argument("--out", default="samples", help="directory of the run: run.json, chunks/, then samples.npz, "
                    "samples.sha256 and grid.png; running the same command again resumes it")
    sa.add_argument("--chunk-size", type=int, default=1000, help="images per chunk file (default 1000)")
    sa.add_argument("--restart", action="store_true", help="discard the chunks already in --out and start again")
    sa.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sa.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda", "triton"])
    sa.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    sa.add_argument("--no-graphs", action="store_true", help="do not capture CUDA graphs")
    sa.add_argument("--channels-last", action="store_true",
                    help="run the model and the steps in channels_last (the same images; on a GPU often faster)")
    bar = sa.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", default=None,
                     help="show a progress bar (the default when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sa.add_argument("--parallel-window", type=int, help="parallel-in-time sampling: refine this many steps at once "
                    "(Picard iterations; the images stay within the tolerance of the sequential ones)")
    sa.add_argument("--parallel-tol", type=float, help="convergence tolerance of --parallel-window (default 0.1)")
    sa.set_defaults(func=cmd_sample)
    ve = sub.add_parser("verify", help="re-check a sampling run's chunks and samples.npz against its run.json",
                        description="Re-check a `ddpm-fast sample` run: each chunk against its sha256 and the "
                        "manifest, samples.npz against samples.sha256 and the chunks, and the model's weights "
                        "against their recorded sha256. Exit status 1 when something does not match.")
    ve.add_argument("dir", help="the --out directory of the run")
    ve.add_argument("--skip-model", action="store_true", help="do not re-hash the model's weights")
    ve.set_defaults(func=cmd_verify)
    tr = sub.add_parser("train", help="train a DDPM U-Net on a folder of images (default: the embedded digits)",
                        description="Train a DDPM U-Net (fused q_sample + loss, Philox noise). Writes the EMA "
                        "weights to --out and the training state beside it (FILE.state.pt) every "
                        "--checkpoint-every steps; --resume continues from that state exactly.")
    tr.add_argument("--data", help="a folder of PNG/JPEG images, any depth of subfolders (default: the digits)")
    tr.add_argument("--model", help=f"{' | '.join(MODEL_PRESETS)} | a JSON file of DDPMUNet arguments or of a "
                    "diffusers UNet2DModel config (default: digits16, or cifar10 with --data)")
    tr.add_argument("--image-size", type=int, help="centre-crop and resize images to this (default: the model's)")
    tr.add_argument("--out", default="digits16.pt", help="checkpoint file to write (the EMA weights)")
    tr.add_argument("--steps", type=int, help="train up to this step (default: the preset's: 4000 for digits16, "
                    "800000 for cifar10)")
    tr.add_argument("--batch-size", type=int, help="default: the preset's (64 for digits16, 128 otherwise)")
    tr.add_argument("--lr", type=float, help="Adam's learning rate (default: 5e-4 for digits16, 2e-4 otherwise)")
    tr.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps (default: 200 / 5000)")
    tr.add_argument("--ema-decay", type=float, help="default: 0.999 for digits16, 0.9999 otherwise")
    tr.add_argument("--grad-clip", type=float, help="max gradient norm, 0 for none (default: 1.0)")
    tr.add_argument("--timesteps", type=int, help="diffusion steps T of the linear schedule (default: 1000)")
    tr.add_argument("--seed", type=int, help="seeds the weights, the data order and the noise (default: 0)")
    tr.add_argument("--no-flip", action="store_true", help="no random horizontal flips of --data images")
    tr.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default: 1000)")
    tr.add_argument("--log-every", type=int, default=100, help="steps between loss read-outs (default: 100)")
    tr.add_argument("--resume", action="store_true", help="continue the run whose state is beside --out")
    tr.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1) - 1,
                    help="processes reading --data images (default: up to 3)")
    tr.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (shown when stderr is a terminal)")
    tr.set_defaults(func=cmd_train)
    ex = sub.add_parser("export", help="write a checkpoint as a diffusers DDPMPipeline directory",
                        description="Write our checkpoint (from `ddpm-fast train`) as a diffusers DDPMPipeline "
                        "directory: unet/ (UNet2DModel), scheduler/ (DDPMScheduler with the same betas) and "
                        "model_index.json.")
    ex.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file written by `ddpm-fast train`")
    ex.add_argument("dir", metavar="DIR", help="output directory (new or empty)")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
