"""Benchmark harness: the machine's floors, timing, and result files (docs/architecture.md, Benchmarks).

Every run measures its own floors (a large device-to-device copy for bandwidth, a large
matmul for compute) so each row can say what fraction of this machine it reaches.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Set, Union

import torch


# ---------------------------------------------------------- optional packages, failures
MISSING: Set[str] = set()  # optional packages found unimportable; run() reports them once, at the end


def optional(name: str):
    """The module, or None when it cannot be imported: the caller skips only what needs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        MISSING.add(name)
        return None


def try_build(make: Callable[[], Callable]) -> Callable:
    """make(), or, when make raises, a stand-in that raises the same error when called: building a
    case fails that one case, where the harness times it, and the suite goes on to its next case."""
    try:
        return make()
    except Exception as e:
        def fail(*_, _e=e, **__):
            raise _e
        return fail


def failure(e: BaseException) -> str:
    """A failed row's status: "failed: <ExceptionType: first line of the message>"."""
    lines = str(e).strip().splitlines()
    return f"failed: {type(e).__name__}" + (f": {lines[0]}" if lines else "")


# ------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, min_time_s: float = 0.2,
            max_reps: int = 200) -> Dict[str, float]:
    """Median and 20th/80th percentile milliseconds of fn().

    GPU: triton.testing.do_bench (L2 flushed between runs) when Triton is present, else CUDA
    events.  CPU: wall clock over repeats after two warm-up calls.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(25, int(min_time_s * 1000)))
            return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
        except ImportError:
            pass
    fn()
    fn()
    sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


# ------------------------------------------------------------------------- floors
# The dtypes the suites' rows run in: each gets its own matmul floor, and a row's MFU divides by the
# floor of its own dtype (a bf16 row over the fp32 floor would read well above 100%).
FLOOR_DTYPES = (torch.float32, torch.bfloat16)


def measure_floors(device: torch.device, quick: bool = False) -> Dict[str, object]:
    """Copy bandwidth (GB/s, read + write counted) and matmul throughput (TFLOP/s) per dtype."""
    n_bytes = (1 << 30 if device.type == "cuda" else 128 << 20) // (4 if quick else 1)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device)
    tflops, sizes = {}, {}
    for dtype in FLOOR_DTYPES:
        n = matmul_size(device, dtype)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        tflops[dtype_name(dtype)] = 2 * n**3 / time_fn(lambda: a @ b, device)["median_ms"] / 1e9
        sizes[dtype_name(dtype)] = n
    return {"copy_bytes": 2 * n_bytes, "copy_gbps": 2 * n_bytes / copy["median_ms"] / 1e6, "matmul_n": sizes,
            "matmul_tflops": tflops}


def matmul_size(device: torch.device, dtype: torch.dtype, most_s: float = 0.5) -> int:
    """n of the n x n matmul that measures the floor: large enough to reach the machine's matmul peak
    even in --quick (a small one would put the U-Net rows, whose convolutions run near that peak,
    above 100%: n = 512 on 2 cores did, by up to 25%).  On a CPU, doubled from 256 up to 2048 while
    one product stays under most_s: a CPU without bfloat16 instructions takes about a minute for
    one 2048^3 bfloat16 product (seen on a 2-core AVX2 EPYC), which at its scalar rate a smaller n
    measures as well."""
    if device.type == "cuda":
        return 8192
    n = 256
    while n < 2048:
        a = torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        a @ a
        if 8 * (time.perf_counter() - t0) > most_s:
            break
        n *= 2
    return n


def dtype_name(dtype: Union[torch.dtype, str]) -> str:
    return str(dtype).replace("torch.", "")


def floors_text(floors: Dict[str, object]) -> str:
    matmul = ", ".join(f"{d} {t:.2f}" for d, t in floors["matmul_tflops"].items())
    beaten = ", ".join(f"{d} {t:.2f}" for d, t in floors.get("compute_tflops", {}).items()
                       if t > floors["matmul_tflops"][d])
    return (f"copy {floors['copy_gbps']:.1f} GB/s, matmul (TFLOP/s) {matmul}"
            + (f"; rows beat the matmul, so the compute floors are {beaten}" if beaten else ""))


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    op: str
    size: str
    impl: str
    numel: int
    dtype: str
    bytes: int
    flops: int
    # Measured and derived figures: None on a failed row, which has none.
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    gbps: Optional[float] = None
    frac_copy_floor: Optional[float] = None
    tflops: Optional[float] = None
    frac_matmul_floor: Optional[float] = None
    baseline: bool = False
    vs: Dict[str, float] = field(default_factory=dict)  # baseline impl -> its time / this time
    steps: int = 0  # end-to-end rows: sampling steps timed, images per call, and what follows
    images: int = 0
    ms_per_step: Optional[float] = None
    images_per_s_1000_steps: Optional[float] = None
    # Parallel-in-time sampling rows: per image, rounds (batched model calls in sequence) and model
    # evaluations, and the largest |pixel| difference from the sequential sampler's images.
    rounds_per_image: Optional[float] = None
    evals_per_image: Optional[float] = None
    max_err_vs_sequential: Optional[float] = None
    status: str = "ok"  # or failure(e); result files from before this field have none and are all ok


def finish_rows(rows: List[Row], floors: Dict[str, float]) -> None:
    """Fill in the derived figures of the rows that succeeded; speed-ups compare only those."""
    ok = [r for r in rows if r.status == "ok"]
    for r in ok:
        s = r.median_ms / 1e3
        r.gbps = r.bytes / s / 1e9
        r.frac_copy_floor = r.gbps / floors["copy_gbps"]
        r.tflops = r.flops / s / 1e12
    # A dtype's compute floor is its large matmul, or a row of this run in that dtype that went faster
    # (on a CPU, a U-Net's convolutions can beat torch's matmul): so MFU <= 100% by construction.
    floors["compute_tflops"] = {d: max([t] + [r.tflops for r in ok if r.dtype == d])
                                for d, t in floors["matmul_tflops"].items()}
    for r in ok:
        floor = floors["compute_tflops"].get(r.dtype)
        r.frac_matmul_floor = r.tflops / floor if floor else None
        # 0.0 on per-op rows, as result files have always had it; training rows time one step per call.
        r.ms_per_step = r.median_ms / r.steps if r.steps else 0.0
        r.images_per_s_1000_steps = r.images / (r.ms_per_step * 1000 / 1e3) if r.steps and r.op != "train" else 0.0
    for r in ok:
        r.vs = {b.impl: b.median_ms / r.median_ms for b in ok
                if b.baseline and b.op == r.op and b.size == r.size and b is not r}


# ------------------------------------------------------------------------ metadata
def metadata(device: torch.device, command: str) -> Dict[str, object]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import _ext

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "extension": _ext.BUILD_INFO,
        "git_commit": commit,
        "command": command,
    }


# --------------------------------------------------------------------------- files
def write_json(path: str, rows: List[Row], floors: Dict[str, float], meta: Dict[str, object]) -> None:
    """Replace path atomically: a run killed while writing leaves the previous version, not half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "floors": floors, "rows": [asdict(r) for r in rows]}, f, indent=1)
    os.replace(tmp, path)


def write_results(name: str, rows: List[Row], floors: Dict[str, float], meta: Dict[str, object],
                  out_dir: str) -> Dict[str, str]:
    """Write NAME.json, NAME.md and, with matplotlib, NAME.png (bandwidth vs size, and a roofline) under out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md", "png")}
    write_json(paths["json"], rows, floors, meta)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, floors, meta))
    if importlib.util.find_spec("matplotlib") is None:
        del paths["png"]
    else:
        plot(rows, floors, meta, paths["png"])
    return paths


def _mfu_rows(rows: List[Row], figures: Callable[[Row], str]) -> List[str]:
    """Table lines "| size | impl | dtype | <figures> | MFU | vs baselines |" of the end-to-end and training rows."""
    out = []
    for r in rows:
        name = f"| {r.size} | {r.impl}{' (baseline)' if r.baseline else ''} | {r.dtype} |"
        if r.status != "ok":
            out.append(f"{name} {r.status} | | | |")
            continue
        vs = ", ".join(f"{k} {v:.2f}x" for k, v in r.vs.items())
        mfu = "" if r.frac_matmul_floor is None else f"{100 * r.frac_matmul_floor:.1f}%"
        out.append(f"{name} {figures(r)} | {mfu} | {vs} |")
    return out


def markdown(rows: List[Row], floors: Dict[str, float], meta: Dict[str, object]) -> str:
    lines = [
        f"Device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, triton {meta['triton']}, "
        f"CUDA {meta['cuda']}, commit {str(meta['git_commit'])[:10]}, {meta['date']}",
        f"Command: `{meta['command']}`",
        f"Floors measured in this run: {floors_text(floors)}; MFU divides by the matmul floor of the row's dtype",
    ]
    if any(not r.steps for r in rows):
        lines += ["", "| op | size | impl | median ms | GB/s | % copy floor | vs baselines (their time / this) |",
                  "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r.steps:
            continue
        name = f"| {r.op} | {r.size} | {r.impl}{' (baseline)' if r.baseline else ''} |"
        if r.status != "ok":
            lines.append(f"{name} {r.status} | | | |")
            continue
        vs = ", ".join(f"{k} {v:.2f}x" for k, v in r.vs.items())
        lines.append(f"{name} {r.median_ms:.4f} | {r.gbps:.2f} | {100 * r.frac_copy_floor:.1f}% | {vs} |")
    e2e = [r for r in rows if r.steps and r.op != "train" and "parallel" not in r.size]
    if e2e:
        lines += ["", f"End to end ({e2e[0].steps} steps timed per call; every one of the 1000 steps costs the same):",
                  "", "| batch | impl | dtype | ms per step | images/s (1000 steps) | MFU | vs baselines |",
                  "| --- | --- | --- | ---: | ---: | ---: | --- |"]
        lines += _mfu_rows(e2e, lambda r: f"{r.ms_per_step:.2f} | {r.images_per_s_1000_steps:.4f}")
    train = [r for r in rows if r.op == "train"]
    if train:
        lines += ["", "Training (one step per call: forward, backward and Adam; 3x the forward's FLOPs):", "",
                  "| batch | impl | dtype | ms per step | images/s | MFU | vs baselines |",
                  "| --- | --- | --- | ---: | ---: | ---: | --- |"]
        lines += _mfu_rows(train, lambda r: f"{r.median_ms:.1f} | {r.images / r.median_ms * 1e3:.2f}")
    par = [r for r in rows if r.steps and "parallel" in r.size]
    if par:
        lines += ["", f"Parallel-in-time sampling ({par[0].steps} steps per call, all of them run; latency per call):",
                  "", "| batch | impl | latency ms | rounds per image | model evals per image | max err vs sequential "
                  "| vs sequential |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in par:
            name = f"| {r.size} | {r.impl}{' (baseline)' if r.baseline else ''} |"
            if r.status != "ok":
                lines.append(f"{name} {r.status} | | | | |")
                continue
            vs = ", ".join(f"{v:.2f}x" for v in r.vs.values())
            lines.append(f"{name} {r.median_ms:.1f} | {r.rounds_per_image:.1f} | {r.evals_per_image:.0f} | "
                         f"{r.max_err_vs_sequential:.2e} | {vs} |")
    from . import targets  # it reads the suites' shapes, and they import this module

    lines += targets.markdown([asdict(r) for r in rows], on_gpu=str(meta["device"]).startswith("cuda"))
    return "\n".join(lines) + "\n"


def plot(rows: List[Row], floors: Dict[str, float], meta: Dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.status == "ok"]
    ops = sorted({r.op for r in rows if not r.steps})
    cols = min(3, len(ops) + 1)
    nrows = -(-(len(ops) + 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.5 * nrows), squeeze=False)
    panels = list(axes.flat)
    for ax in panels[len(ops) + 1:]:
        ax.axis("off")
    for ax, op in zip(panels, ops):
        # One x position per benchmarked size, in the suite's order (several shapes share an element
        # count, so a numeric axis would stack them).
        sizes = list(dict.fromkeys(r.size for r in rows if r.op == op))
        for impl in sorted({r.impl for r in rows if r.op == op}):
            pts = sorted((sizes.index(r.size), r.gbps) for r in rows if r.op == op and r.impl == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(floors["copy_gbps"], color="k", ls="--", lw=1, label="copy floor")
        ax.set(yscale="log", xlabel="size", ylabel="GB/s", title=f"{op}: bandwidth")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes, rotation=35, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    ax = panels[len(ops)]
    # One roof per dtype, from its own matmul floor; each point is drawn in its dtype's colour.
    peak_bw = floors["copy_gbps"] * 1e9
    xs = [2.0**k for k in range(-6, 12)]
    compute = floors.get("compute_tflops", floors["matmul_tflops"])
    colours = dict(zip(compute, ("k", "tab:red", "tab:blue")))
    for dtype, tflops in compute.items():
        ax.plot(xs, [min(tflops * 1e12, x * peak_bw) / 1e12 for x in xs], "--", color=colours[dtype], lw=1,
                label=f"roofline {dtype} (measured floors)")
    markers = "osD^v<>"
    for op, impl, dtype in sorted({(r.op, r.impl, r.dtype) for r in rows if r.flops and r.bytes}):
        pts = [(r.flops / r.bytes, r.tflops) for r in rows if (r.op, r.impl, r.dtype) == (op, impl, dtype)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, marker=markers[ops.index(op) % len(markers)],
                   color=colours.get(dtype, "tab:gray"), label=f"{op} / {impl} ({dtype})")
    ax.set(xscale="log", yscale="log", xlabel="FLOP / byte", ylabel="TFLOP/s",
           title="roofline (one point per size)")
    ax.legend(fontsize=6)
    fig.suptitle(f"{meta['device_name']} — torch {meta['torch']} — {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
