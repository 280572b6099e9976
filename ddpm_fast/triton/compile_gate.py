"""Compile gate: every Triton kernel, compiled for real GPU targets on a machine without a GPU.

The CPU interpreter (TRITON_INTERPRET=1) runs the kernels' Python, and it is lenient where the
compiler is strict: it reads plain Python globals, and it never specialises an int argument equal
to 1 into a constant.  This gate runs the package's own launchers with a stand-in driver whose
target is a chosen GPU (sm_80, sm_90), the launch made a warm-up: Triton specialises the arguments
exactly as a launch on that GPU would (ints equal to 1 become constants, 16-divisible ints and
16-byte aligned pointers get divisibility hints) and compiles through ptxas, and nothing runs.
ptxas -v then gives each compiled kernel's registers and spill bytes.

    python -m ddpm_fast.triton.compile_gate                    # sm_80 and sm_90, table on stdout
    python -m ddpm_fast.triton.compile_gate --arch 90 --only p_step --json gate.json

Exit code 1 when a kernel fails to compile or spills more than --spill-budget bytes (default 0).
Run it in a process where TRITON_INTERPRET is unset: the kernels must be imported as JIT functions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

DTYPES = ("float32", "float16", "bfloat16")
ARCHS = (80, 90)
# Bytes of spill stores + loads allowed per kernel: none.  The last small spills (a 64-bit value or two
# around the local array of libdevice's sinf/cosf range reduction in the noise kernels, and at the
# largest GroupNorm and 16-bit d = 128 attention tiles under triton 3.6) went with the Box-Muller's own
# sin/cos (ddpm_fast/triton/philox.py), up to 16 warps for GroupNorm tiles and 2 stages for that tile.
SPILL_BUDGET = 0
# Shared memory one block may have (opted in), by compute capability: a kernel over it compiles but
# cannot launch there.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class Plan:
    """One launcher call: the op, a label naming what it varies, and the launcher's arguments."""
    op: str
    label: str
    args: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------- the plans
def _shapes():
    # 16-divisible sizes (divisibility hints), [B, C, 1, 1] and [1, 1, 1, 1] (HW, C, N, B = 1 become
    # constants), odd sizes (no hints, masked tails), and many channels (channels_last tiles of 64).
    return {"b4x3x32x32": (4, 3, 32, 32), "b2x4x1x1": (2, 4, 1, 1), "b1x1x1x1": (1, 1, 1, 1), "b3x5x7x9": (3, 5, 7, 9),
            "b2x64x8x8": (2, 64, 8, 8)}


def _elementwise_plans() -> Iterator[Plan]:
    shapes = _shapes()
    for dtype in DTYPES:
        for name, shape in shapes.items():
            yield Plan("philox_randn", f"{dtype} {name}", dict(dtype=dtype, shape=shape, seed=2**64 - 1,
                                                               stream=2, sample_offset=7))
        yield Plan("philox_randn", f"{dtype} seed=1 stream=1 offset=1 t=1",
                   dict(dtype=dtype, shape=(2, 3, 8, 8), seed=1, stream=1, sample_offset=1, t=1))
        # Every constexpr combination at the common 16-divisible shape (noise: passed in, drawn from
        # the int seed, or drawn from an rng tensor) ...
        for layout, noise in itertools.product(("nchw", "channels_last"), ("tensor", "seed", "rng")):
            for ret in (False, True):
                yield Plan("q_sample", f"{dtype} {layout} noise={noise} return_noise={ret}",
                           dict(dtype=dtype, shape=shapes["b4x3x32x32"], layout=layout, noise=noise, return_noise=ret))
            for pred, var, form, clip in itertools.product(range(3), range(3), range(2), (False, True)):
                yield Plan("p_step", f"{dtype} {layout} noise={noise} prediction={pred} variance={var} form={form} "
                           f"clip={clip}", dict(dtype=dtype, shape=shapes["b4x3x32x32"], layout=layout, noise=noise,
                                                prediction=pred, variance=var, form=form, clip=clip))
        # ... and the specialising shapes and scalars with every layout, noise source and variance
        # (the constexprs that change the index math).
        special = ("b2x4x1x1", "b1x1x1x1", "b3x5x7x9", "b2x64x8x8")
        for name, layout, noise in itertools.product(special, ("nchw", "channels_last"), ("tensor", "seed")):
            yield Plan("q_sample", f"{dtype} {name} {layout} noise={noise}",
                       dict(dtype=dtype, shape=shapes[name], layout=layout, noise=noise, return_noise=True, seed=1,
                            sample_offset=1, T=1))
            for var in range(3):
                yield Plan("p_step", f"{dtype} {name} {layout} noise={noise} variance={var} seed=1 offset=1 T=1",
                           dict(dtype=dtype, shape=shapes[name], layout=layout, noise=noise, prediction=0, variance=var,
                                form=0, clip=True, seed=1, sample_offset=1, T=1))
    yield Plan("philox4x32", "N=1", dict(N=1))
    yield Plan("philox4x32", "N=100", dict(N=100))


def _picard_plans() -> Iterator[Plan]:
    # Every constexpr combination in float32 at a window of 16 over a 3x32x32 image (several programs
    # per image), each variance in the half dtypes, then windows of one image element (N = 1: one
    # masked Philox group) and odd sizes.
    for pred, var, form, clip in itertools.product(range(3), range(3), range(2), (False, True)):
        yield Plan("picard_step", f"float32 prediction={pred} variance={var} form={form} clip={clip}",
                   dict(dtype="float32", shape=(2, 17, 3, 32, 32), prediction=pred, variance=var, form=form, clip=clip))
    for dtype, var in itertools.product(DTYPES, range(3)):
        if dtype != "float32":
            yield Plan("picard_step", f"{dtype} variance={var}", dict(dtype=dtype, shape=(2, 17, 3, 32, 32),
                                                                     prediction=0, variance=var, form=0, clip=True))
        for shape in ((1, 2, 1, 1, 1), (3, 6, 5, 7, 9)):
            yield Plan("picard_step", f"{dtype} {'x'.join(map(str, shape))} variance={var}",
                       dict(dtype=dtype, shape=shape, prediction=0, variance=var, form=0, clip=True))


def _group_norm_plans() -> Iterator[Plan]:
    # Forward and backward, each path (on-chip: split=1 on a group that fits; split: split=4) and
    # layout, every flag at the CIFAR U-Net's shape, then the specialising shapes with all flags and
    # none: G = C (CG = 1), [B, C, 1, 1] (HW = 1), HW = CG = 1 together, an odd one, and a group too
    # large for on-chip.
    flag_sets = [dict(weight=True, bias=True, add=True, scale=True, shift=True, silu=True), dict(),
                 dict(weight=True, bias=True, silu=True), dict(add=True), dict(scale=True), dict(shift=True)]
    shapes = [((2, 128, 32, 32), 32), ((2, 256, 4, 4), 32), ((2, 8, 5, 5), 8), ((2, 64, 1, 1), 32), ((1, 4, 1, 1), 4),
              ((3, 6, 7, 9), 3), ((1, 64, 64, 64), 2)]
    cases = [(shapes[0], flags) for flags in flag_sets]
    cases += [(shape, flags) for shape in shapes[1:] for flags in flag_sets[:2]]
    # The backward's flags only add loads and arithmetic, never index math: every flag at once (and
    # none, and the U-Net's weight+bias+SiLU) at the CIFAR shape, every flag at the others.
    backward = [(shapes[0], flags) for flags in flag_sets[:3]] + [(shape, flag_sets[0]) for shape in shapes[1:]]
    for op, op_cases in (("group_norm", cases), ("group_norm_backward", backward)):
        for dtype, ((shape, groups), flags), layout, split in itertools.product(DTYPES, op_cases,
                                                                               ("nchw", "channels_last"), (1, 4)):
            yield Plan(op, f"{dtype} {'x'.join(map(str, shape))} G={groups} {layout} split={split} "
                       f"{'+'.join(sorted(flags)) or 'plain'}",
                       dict(dtype=dtype, shape=shape, groups=groups, layout=layout, split=split, **flags))
    # The forward with every parameter in x's 16-bit dtype (a bf16 model): other pointer types, so kernels
    # of their own (the backward gets float32 parameters from ops.py).
    (shape, groups), flags = shapes[0], flag_sets[0]
    for dtype, layout, split in itertools.product(DTYPES[1:], ("nchw", "channels_last"), (1, 4)):
        yield Plan("group_norm", f"{dtype} {'x'.join(map(str, shape))} G={groups} {layout} split={split} all, "
                   "parameters in x's dtype", dict(dtype=dtype, shape=shape, groups=groups, layout=layout,
                                                   split=split, params_like_x=True, **flags))


def _attention_plans() -> Iterator[Plan]:
    # Every BLOCK_D (d = 1 .. 256) with an aligned and an unaligned d where the block sizes differ
    # (attention._config), Lq = Lk = 1 and H = 1, 16-divisible and odd lengths, and q/k/v as strided views
    # of one fused projection (unaligned pointers, d not the contiguous stride's size), as the U-Net's
    # attention block passes them (at d = 256 in the CIFAR-10 DDPM).
    for dtype in DTYPES:
        for d in (1, 16, 32, 33, 64, 100, 128, 200, 256):
            yield Plan("attention", f"{dtype} d={d} L=64 H=2", dict(dtype=dtype, B=2, H=2, Lq=64, Lk=64, d=d))
        yield Plan("attention", f"{dtype} d=64 Lq=Lk=1 H=1 B=1", dict(dtype=dtype, B=1, H=1, Lq=1, Lk=1, d=64))
        yield Plan("attention", f"{dtype} d=40 Lq=70 Lk=45 H=3", dict(dtype=dtype, B=2, H=3, Lq=70, Lk=45, d=40))
        yield Plan("attention", f"{dtype} d=64 fused qkv view", dict(dtype=dtype, B=2, H=4, Lq=48, Lk=48, d=64,
                                                                      fused=True))
        yield Plan("attention", f"{dtype} d=256 fused qkv view", dict(dtype=dtype, B=2, H=1, Lq=256, Lk=256, d=256,
                                                                       fused=True))


PLAN_SETS: Dict[str, Callable[[], Iterator[Plan]]] = {
    "elementwise": _elementwise_plans, "picard": _picard_plans, "group_norm": _group_norm_plans,
    "attention": _attention_plans}


def all_plans(only: Optional[List[str]] = None) -> List[Plan]:
    plans = [p for make in PLAN_SETS.values() for p in make()]
    return [p for p in plans if not only or p.op in only]


# ------------------------------------------------------------------ running a plan
def _run_plan(plan: Plan) -> None:
    """Calls the launcher as ddpm_fast.ops would, on CPU tensors (never touched: the launch is a
    warm-up)."""
    import torch

    from ddpm_fast.schedule import NoiseSchedule

    a = plan.args
    dtype = getattr(torch, a.get("dtype", "float32"))
    if plan.op == "philox4x32":
        from .philox import philox4x32

        philox4x32(torch.zeros(a["N"], 4, dtype=torch.long), torch.zeros(a["N"], 2, dtype=torch.long))
        return
    if plan.op == "attention":
        from .attention import attention

        B, H, Lq, Lk, d = a["B"], a["H"], a["Lq"], a["Lk"], a["d"]
        if a.get("fused"):
            qkv = torch.empty(B, Lq, 3, H, d, dtype=dtype)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            q = torch.empty(B, H, Lq, d, dtype=dtype)
            k, v = torch.empty(B, H, Lk, d, dtype=dtype), torch.empty(B, H, Lk, d, dtype=dtype)
        attention(q, k, v, d ** -0.5)
        return
    shape = a["shape"]
    if plan.op == "picard_step":
        from .picard import picard_step

        A, P1, C = shape[:3]
        out_shape = (A, P1 - 1, 2 * C if a["variance"] == 2 else C, *shape[3:])
        table = NoiseSchedule.linear(1000, 1e-4, 0.02).to("cpu").table
        picard_step(torch.empty(shape, dtype=dtype), torch.empty(out_shape, dtype=dtype),
                    torch.zeros(A, P1 - 1, dtype=torch.long), table, torch.zeros(A, dtype=torch.long), 12345,
                    a["prediction"], a["variance"], a["form"], a["clip"], 1.0)
        return
    fmt = torch.channels_last if a.get("layout") == "channels_last" else torch.contiguous_format
    if plan.op in ("group_norm", "group_norm_backward"):
        from .group_norm import group_norm, group_norm_backward

        B, C = shape[:2]
        x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        pdtype = dtype if a.get("params_like_x") else torch.float32
        vec = {k: torch.empty(C, dtype=pdtype) for k in ("weight", "bias") if a.get(k)}
        per_sample = {k: torch.empty(B, C, dtype=pdtype) for k in ("add", "scale", "shift") if a.get(k)}
        params = (vec.get("weight"), vec.get("bias"), per_sample.get("add"), per_sample.get("scale"),
                  per_sample.get("shift"), bool(a.get("silu")), fmt == torch.channels_last)
        if plan.op == "group_norm":
            group_norm(x, a["groups"], *params[:2], 1e-5, *params[2:], split=a["split"])
        else:
            stats = torch.empty(B, a["groups"])
            group_norm_backward(torch.empty_like(x), x, stats, stats, a["groups"], *params, split=a["split"])
        return
    B = shape[0]
    T = a.get("T", 1000)
    table = NoiseSchedule.linear(T, 1e-4, 0.02).to("cpu").table if T > 1 else NoiseSchedule([0.5]).to("cpu").table
    t = torch.zeros(B, dtype=torch.long)
    seed = a.get("seed", 12345)
    offset = a.get("sample_offset", 0)
    if plan.op == "philox_randn":
        from .philox import philox_randn

        philox_randn(t + a.get("t", 0), shape[1:], seed, a["stream"], offset, dtype)
        return
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
    noise = torch.empty_like(x) if a["noise"] == "tensor" else None
    rng = torch.tensor([seed, offset]) if a["noise"] == "rng" else None
    if a["noise"] != "seed":
        seed, offset = 0, 0  # as ddpm_fast.ops passes them with noise or rng
    if plan.op == "q_sample":
        from .q_sample import q_sample

        q_sample(x, t, table, noise, seed, offset, rng, a["return_noise"], fmt == torch.channels_last)
        return
    from .p_step import p_step

    out_shape = (B, 2 * shape[1], *shape[2:]) if a["variance"] == 2 else shape
    out = torch.empty(out_shape, dtype=dtype).contiguous(memory_format=fmt)
    p_step(x, out, t, table, noise, seed, offset, rng, a["prediction"], a["variance"], a["form"], a["clip"], 1.0,
           fmt == torch.channels_last)


class _StandInDriver:
    """Just enough of a Triton driver to compile for a chosen target: device 0, stream 0."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


_WORKER: dict = {}


def _init_worker(arch: int, cache: str) -> None:
    """Per process: the stand-in driver, and every JIT launch turned into a warm-up that records
    what it compiled with the log of Triton's own ptxas -v run."""
    # A cache of its own, empty: a kernel another process compiled would be found on disk, and
    # not compiled again, so its ptxas log would not be printed here.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache)
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_StandInDriver(arch))
    knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of each ptxas run it makes
    original = JITFunction.run
    _WORKER.update(arch=arch, compiled=[], logs={})

    def warm_up(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        # A kernel found in Triton's in-process cache was not compiled again: reuse its log.
        _WORKER["logs"].setdefault(id(kernel), log.getvalue())
        _WORKER["compiled"].append((self.fn.__name__, kernel, _WORKER["logs"][id(kernel)]))
        return kernel

    JITFunction.run = warm_up


def ptxas_usage(log: str) -> Dict[str, int]:
    """Registers and spill bytes from a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs:
        raise RuntimeError(f"no register count in the ptxas log: {log[:200]!r}")
    return {"registers": int(regs.group(1)), "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else 0}


def _compile(job) -> List[dict]:
    """Compiles one plan for the worker's arch: one record per kernel it launches, or one failure."""
    index, plan = job
    arch = _WORKER["arch"]
    _WORKER["compiled"] = []
    base = dict(op=plan.op, label=plan.label, arch=f"sm_{arch}", plan=index)
    try:
        _run_plan(plan)
        if not _WORKER["compiled"]:
            raise RuntimeError("the launcher launched no kernel")
        return [dict(base, kernel=name, ok=True, num_warps=kernel.metadata.num_warps,
                     shared_bytes=kernel.metadata.shared, **ptxas_usage(log))
                for name, kernel, log in _WORKER["compiled"]]
    except Exception as e:  # the gate's finding: reported, never raised
        # Triton's CompilationError shows the source line of each inlined call down to the innermost,
        # whose last line is the cause.
        where = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
        while e.__cause__ is not None:
            e = e.__cause__
        cause = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
        error = f"{type(e).__name__}: {cause[-1] if cause else ''}"
        if where and where[-1] not in error:
            error += f" (at: {where[-1]})"
        return [dict(base, kernel="?", ok=False, error=error)]


def run_gate(archs=ARCHS, only: Optional[List[str]] = None, jobs: int = 0) -> List[dict]:
    """Compiles every plan for every arch; returns one record per compiled kernel (or failure)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile gate needs TRITON_INTERPRET unset: under the interpreter the kernels "
                           "are not JIT functions")
    plans = list(enumerate(all_plans(only)))
    jobs = jobs or os.cpu_count() or 1
    records: List[dict] = []
    # An empty cache: a kernel found on disk would not be compiled, and its ptxas log not printed.
    with tempfile.TemporaryDirectory() as cache:
        for arch in archs:
            # A process pool per arch: a driver and Triton's in-process kernel cache belong to one target.
            with ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(arch, cache)) as pool:
                for recs in pool.map(_compile, plans, chunksize=4):
                    records.extend(recs)
    return records


# ------------------------------------------------------------------------ reports
def summary(records: List[dict]) -> List[dict]:
    """Per (kernel, arch): variants compiled, failures, the most registers and spill bytes."""
    rows: Dict[tuple, dict] = {}
    for r in records:
        key = (r["op"], r["kernel"], r["arch"])
        s = rows.setdefault(key, dict(op=r["op"], kernel=r["kernel"], arch=r["arch"], variants=0, failed=0,
                                      max_registers=0, max_spill_bytes=0, max_shared_bytes=0, worst=""))
        s["variants"] += 1
        if not r["ok"]:
            s["failed"] += 1
            continue
        if (r["spill_bytes"], r["registers"]) > (s["max_spill_bytes"], s["max_registers"]):
            s["worst"] = r["label"]
        s["max_registers"] = max(s["max_registers"], r["registers"])
        s["max_spill_bytes"] = max(s["max_spill_bytes"], r["spill_bytes"])
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r["shared_bytes"])
    return sorted(rows.values(), key=lambda s: (s["op"], s["kernel"], s["arch"]))


def problems(records: List[dict], spill_budget: int = SPILL_BUDGET) -> List[str]:
    out = [f"{r['arch']} {r['op']} [{r['label']}]: {r['error']}" for r in records if not r["ok"]]
    out += [f"{r['arch']} {r['kernel']} [{r['label']}]: {r['spill_bytes']} bytes spilled (budget {spill_budget})"
            for r in records if r["ok"] and r["spill_bytes"] > spill_budget]
    for r in records:
        limit = MAX_SHARED_BYTES.get(int(r["arch"][3:]))
        if r["ok"] and limit and r["shared_bytes"] > limit:
            out.append(f"{r['arch']} {r['kernel']} [{r['label']}]: {r['shared_bytes']} bytes of shared memory, "
                       f"over the {limit} a block can have")
    return out


def markdown(rows: List[dict]) -> str:
    lines = ["| op | kernel | arch | variants | failed | max registers | max spill bytes | max shared bytes | "
             "most registers at |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {s['op']} | {s['kernel']} | {s['arch']} | {s['variants']} | {s['failed']} | {s['max_registers']} | "
              f"{s['max_spill_bytes']} | {s['max_shared_bytes']} | {s['worst']} |" for s in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.triton.compile_gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,90")
    p.add_argument("--only", help="comma-separated ops (philox_randn, philox4x32, q_sample, p_step, picard_step, "
                                  "group_norm, group_norm_backward, attention)")
    p.add_argument("--jobs", type=int, default=0, help="compile processes (default: one per CPU)")
    p.add_argument("--spill-budget", type=int, default=SPILL_BUDGET, help="spill bytes allowed per kernel")
    p.add_argument("--json", help="write every record and the summary here")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        p.error(f"--arch: expected comma-separated ints like 80,90, got {args.arch!r}")
    records = run_gate(archs, args.only.split(",") if args.only else None, args.jobs)
    rows = summary(records)
    print(markdown(rows))
    bad = problems(records, args.spill_budget)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "spill_budget": args.spill_budget, "summary": rows, "records": records,
                       "problems": bad}, f, indent=1)
    spilled = [r for r in records if r["ok"] and 0 < r["spill_bytes"] <= args.spill_budget]
    print(f"\n{len(records)} kernels compiled from {len({r['plan'] for r in records})} launches x {len(archs)} archs; "
          f"{len(spilled)} spill within the budget of {args.spill_budget} bytes; {len(bad)} problems")
    for r in spilled[:10]:
        print(f"  spill: {r['arch']} {r['kernel']} [{r['label']}]: {r['spill_bytes']} bytes")
    for line in bad[:50]:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
