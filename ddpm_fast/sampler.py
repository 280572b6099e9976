"""DDPMSampler: ancestral sampling whose whole loop stays on the device.

Image i of a run depends only on (seed, i): x_T is Philox stream 2 of sample i, and every step's
noise is stream 0 of sample i at that step, drawn inside the fused p_step kernel.  Batch size,
backend, the number of processes and CUDA graphs change nothing about it.

Per step: one model call and one fused p_step; no .item(), no host sync.  With CUDA graphs (on by
default on CUDA) the model call and the step are captured once per batch size and replayed; a step
that runs on the reference backend runs eagerly instead (it reads host tables).  The captures live
for one sample() call (a warm-up and a capture cost about three eager steps per batch shape); with
keep_graphs=True they are kept, with their memory, for later calls of a torch module, and captured
anew when what _graph_key sees changes; a change it cannot see (the module's code, hooks, Python
attributes or scalars) needs release_graphs().
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .parallel import ParallelConfig, ParallelStats
from .parallel import run as run_parallel
from .reference.philox import STREAM_INIT
from .schedule import NoiseSchedule

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def spaced_timesteps(T: int, num_steps: int) -> list:
    """num_steps timesteps evenly spaced over [0, T), always including 0 and T - 1."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps: expected an int in [1, {T}], got {num_steps}")
    if num_steps == 1:
        return [T - 1]
    return sorted({round(k * (T - 1) / (num_steps - 1)) for k in range(num_steps)})


def model_defaults(model) -> dict:
    """Sampling options and the sample shape a model's config implies."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    cin, cout = get("in_channels"), get("out_channels")
    size = get("image_size", get("sample_size"))
    if isinstance(size, (list, tuple)):
        size = size[0]
    out = {}
    if cin and size:
        out["sample_shape"] = (int(cin), int(size), int(size))
    if cin and cout == 2 * cin:
        out["variance"] = "learned_range"
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images [N, C, H, W] -> uint8 [N, H, W, C] (the layout FID tools read)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# torch's settings that choose the kernels a capture bakes in.  The precision ones are read through
# both APIs: torch refuses a legacy read once the new fp32_precision API has been used, and older torch
# has only the legacy one; a setting made through either moves a read that works.
_SETTINGS = (lambda: torch.backends.cudnn.allow_tf32, lambda: torch.backends.cudnn.conv.fp32_precision,
             lambda: torch.get_float32_matmul_precision(), lambda: torch.backends.cuda.matmul.fp32_precision,
             lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
             lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
             lambda: torch.backends.cudnn.enabled, lambda: torch.backends.cudnn.deterministic,
             lambda: torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled,
             torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.math_sdp_enabled)


def _kernel_settings() -> tuple:
    out = []
    for read in _SETTINGS:
        try:
            out.append(read())
        except (RuntimeError, AttributeError):
            out.append(None)
    return tuple(out)


class _Captures(dict):
    """The captures by shape, recording which ones a call used: a kept sampler drops the others
    before its next call, so captures of batch shapes no longer sampled do not pile up."""

    def __init__(self):
        super().__init__()
        self.used = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def start_call(self) -> "_Captures":
        for key in set(self) - self.used:
            del self[key]
        self.used = set()
        return self


class DDPMSampler:
    def __init__(self, model: Union[torch.nn.Module, Callable], schedule: Optional[NoiseSchedule] = None, *,
                 prediction: str = "epsilon", variance: Optional[str] = None, clip_sample: bool = True,
                 clip_range: float = 1.0, form: str = "posterior", backend: str = "auto",
                 dtype: Union[str, torch.dtype] = torch.float32, cuda_graphs: Optional[bool] = None,
                 channels_last: bool = False, device: Union[str, torch.device, None] = None,
                 parallel: Optional[ParallelConfig] = None, keep_graphs: bool = False):
        if not callable(model):
            raise TypeError(f"model: expected a torch module or a callable eps_model(x, t), got {type(model).__name__}")
        self.model = model
        self.schedule = schedule if schedule is not None else NoiseSchedule.linear(1000)
        if not isinstance(self.schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(self.schedule).__name__}")
        defaults = model_defaults(model)
        self.default_shape = defaults.get("sample_shape")
        self.options = dict(prediction=prediction, variance=variance or defaults.get("variance", "fixed_small"),
                            clip_sample=bool(clip_sample), clip_range=clip_range, form=form)
        from . import _checks

        _checks.choice(self.options["prediction"], "prediction", _checks.PREDICTIONS)
        _checks.choice(self.options["variance"], "variance", _checks.VARIANCES)
        _checks.choice(form, "form", _checks.FORMS)
        _checks.choice(backend, "backend", ops.BACKENDS)
        self.backend = backend
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        if device is None:
            p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
            device = p.device if p is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs: CUDA graphs need a CUDA device")
        self.channels_last = channels_last
        if parallel is not None and not isinstance(parallel, ParallelConfig):
            raise TypeError(f"parallel: expected a ParallelConfig or None, got {type(parallel).__name__}")
        self.parallel = parallel
        self.parallel_stats: Optional[ParallelStats] = None  # per image of the last sample() with parallel
        if not isinstance(keep_graphs, bool):
            raise TypeError(f"keep_graphs: expected a bool, got {type(keep_graphs).__name__}")
        self.keep_graphs = keep_graphs
        self._kept: Optional[tuple] = None  # (_graph_key, tables, t_model, captures, schedule) of the last call
        if isinstance(model, torch.nn.Module):
            model.eval()
            if channels_last:
                model.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- model call
    def _eps(self, x: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        # No cast cache: inside a user's own autocast it would outlive this call, and a capture would
        # read its casts by address; uncached, the casts are part of the captured step.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            out = self.model(x, t_model)
        out = getattr(out, "sample", out)
        if isinstance(out, tuple):
            out = out[0]
        return out.float()

    def _check_output(self, out: torch.Tensor, x: torch.Tensor) -> None:
        C = x.shape[1]
        want = (x.shape[0], 2 * C, *x.shape[2:]) if self.options["variance"] == "learned_range" else tuple(x.shape)
        if tuple(out.shape) != want:
            raise ValueError(f"model: its output shape {tuple(out.shape)} does not fit the samples {tuple(x.shape)} "
                             f"(expected {want} for variance={self.options['variance']!r})")

    # ---------------------------------------------------------------------- loop
    def _plan(self, num_steps: Optional[int]) -> Tuple[NoiseSchedule, list]:
        T = self.schedule.num_timesteps
        if num_steps is None or num_steps == T:
            return self.schedule, list(range(T))
        ts = spaced_timesteps(T, int(num_steps))
        return self.schedule.respace(ts), ts

    @torch.no_grad()
    def sample(self, num_images: int, seed: int = 0, batch_size: Optional[int] = None,
               num_steps: Optional[int] = None, sample_shape: Optional[Sequence[int]] = None, start_index: int = 0,
               progress: bool = False) -> torch.Tensor:
        """Images start_index .. start_index + num_images - 1 of the run ``seed``, as float32 [N, C, H, W]
        on the CPU (clamped to [-1, 1] when clip_sample is on).  ``progress``: True for a tqdm bar over
        image-steps, or an object whose update(n) is called with the batch size after each step."""
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
            raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
        shape = tuple(sample_shape) if sample_shape is not None else self.default_shape
        if shape is None or len(shape) != 3:
            raise ValueError("sample_shape: a bare callable has no config; pass sample_shape=(C, H, W)")
        batch_size = batch_size or min(num_images, 256)
        if batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        tables, t_model, graphs = self._call_state(num_steps, seed)
        bar, own_bar = None, False
        if hasattr(progress, "update"):
            bar = progress
        elif progress:
            try:
                from tqdm import tqdm

                bar, own_bar = tqdm(total=num_images * len(t_model), unit="img-step"), True
            except ImportError:
                pass
        out, stats = [], []
        # A capture, and a Triton launch, runs on the current device: make it the sampler's.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for i0 in range(start_index, start_index + num_images, batch_size):
                b = min(batch_size, start_index + num_images - i0)
                x = ops.philox_randn((b, *shape), seed, t=0, stream=STREAM_INIT, sample_offset=i0, device=self.device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if self.parallel is not None:
                    x, st = run_parallel(self, x, tables, t_model, seed, i0, self.parallel, bar, graphs)
                    stats.append(st)
                elif self.cuda_graphs:
                    x = self._run_graphed(x, tables, t_model, seed, i0, bar, graphs)
                else:
                    x = self._run_eager(x, tables, t_model, seed, i0, bar)
                out.append(x.float().cpu())
        if own_bar:
            bar.close()
        if stats:
            self.parallel_stats = ParallelStats(torch.cat([s.rounds for s in stats]),
                                                torch.cat([s.evaluations for s in stats]))
        images = torch.cat(out)
        return images.clamp(-1, 1) if self.options["clip_sample"] else images

    def release_graphs(self) -> None:
        """Frees the CUDA graphs kept from earlier sample() calls (keep_graphs=True), and the memory
        they hold; the next call captures anew."""
        self._kept = None

    def _graph_key(self, ts: list, seed: int):
        """What the captures of a call depend on beyond their static buffers, where keep_graphs keeps
        them; None where they live for one call.  A capture reads the schedule's tables, the model's
        parameters and buffers by address, and what the model derived from them when it was captured
        (the fused attention's concatenated QKV weights); it replays the modules' train/eval modes
        and the kernels torch's settings chose then, and a parallel round's capture takes the seed as
        a kernel argument.  So the key holds the schedule object, the steps, every module's mode,
        each parameter and buffer's storage and version (an in-place update moves it), the sampler's
        options and torch's settings.  A bare callable may close over anything, and an inference
        tensor has no version: their captures live for one call."""
        if not (self.keep_graphs and self.cuda_graphs and isinstance(self.model, torch.nn.Module)):
            return None
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if any(t.is_inference() for t in tensors):
            return None
        return (id(self.schedule), tuple(ts), tuple(m.training for m in self.model.modules()), self.backend,
                self.dtype, self.channels_last, tuple(sorted(self.options.items())),
                None if self.parallel is None else (self.parallel, seed), _kernel_settings(),
                tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors))

    def _call_state(self, num_steps: Optional[int], seed: int):
        """(the schedule's device tables, the model's timesteps, the captures by shape) for a
        sample() call: those of the previous call where its captures are still valid, else new."""
        sched, ts = self._plan(num_steps)
        key = self._graph_key(ts, seed)
        if key is not None and self._kept is not None and self._kept[0] == key:
            tables, t_model, graphs = self._kept[1:4]
            return tables, t_model, graphs.start_call()
        self._kept = None  # stale captures go before new ones take memory
        tables = sched.to(self.device)  # built once: no host copy per step
        t_model = torch.tensor(ts, dtype=torch.long, device=self.device)
        graphs = _Captures()  # sample (or window state) shape -> captured step, reused by every batch of that shape
        if key is not None:  # the schedule is held so that its id in the key stays its own
            self._kept = (key, tables, t_model, graphs, self.schedule)
        return tables, t_model, graphs

    def _step(self, x, tables, k, t_vec_model, t_idx, key):
        eps = self._eps(x, t_vec_model)
        if k is not None:
            self._check_output(eps, x)
        return ops.p_step(x, eps, t_idx, tables, backend=self.backend, **key, **self.options)

    def _run_eager(self, x, tables, t_model, seed, i0, bar):
        b = x.shape[0]
        for k in range(len(t_model) - 1, -1, -1):
            x = self._step(x, tables, k, t_model[k].expand(b), k, dict(seed=seed, sample_offset=i0))
            if bar is not None:
                bar.update(b)
        return x

    def _capture(self, x, tables, t_model) -> dict:
        """One step as a CUDA graph over static buffers: the sample, the model's timestep, the
        schedule index and the Philox (seed, sample offset), all refreshed on the device before each
        replay, so one capture serves every batch of this size."""
        b = x.shape[0]
        g = dict(x=x.clone(), t_model=t_model[-1:].expand(b).clone(),
                 t_idx=torch.full((b,), len(t_model) - 1, dtype=torch.long, device=self.device),
                 rng=torch.zeros(2, dtype=torch.long, device=self.device), graph=torch.cuda.CUDAGraph())
        key = dict(rng=g["rng"])
        self._check_output(self._eps(g["x"], g["t_model"]), g["x"])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, autotuning, lazy init)
            for _ in range(2):
                self._step(g["x"], tables, None, g["t_model"], g["t_idx"], key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.cuda.graph(g["graph"]):
            g["y"] = self._step(g["x"], tables, None, g["t_model"], g["t_idx"], key)
        return g

    def _run_graphed(self, x, tables, t_model, seed, i0, bar, graphs):
        if ops.pick_backend("p_step", self.backend, self.device, x.dtype) == "reference":
            # The reference step indexes the schedule's float64 tables on the host, a copy to the
            # device that a capture refuses: it runs eagerly (it is the truth, not the fast path).
            return self._run_eager(x, tables, t_model, seed, i0, bar)
        b = x.shape[0]
        if x.shape not in graphs:
            graphs[x.shape] = self._capture(x, tables, t_model)
        g = graphs[x.shape]
        g["x"].copy_(x)
        # fill_ with a host scalar is a kernel argument: no host-to-device copy, no sync.
        g["rng"][0].fill_(ops.seed_bits(seed))
        g["rng"][1].fill_(i0)
        idx_table = torch.arange(len(t_model), dtype=torch.long, device=self.device)
        for k in range(len(t_model) - 1, -1, -1):
            g["t_model"].copy_(t_model[k].expand(b))
            g["t_idx"].copy_(idx_table[k].expand(b))
            g["graph"].replay()
            g["x"].copy_(g["y"])
            if bar is not None:
                bar.update(b)
        return g["x"].clone()
