"""Where each benchmark case's time goes: the host (Python, dispatch, launch calls) against the GPU
(the kernels it launches), by torch.profiler, over the cases that `ddpm-fast bench` times.

    python benchmarks/profile_host.py OUT_DIR [--suites group_norm,attention] [--full] [--impl REGEX]
                                      [--with-compile] [--calls N]

The bench record times a call between CUDA events with L2 flushed before it (triton's do_bench).
For a call of tens of microseconds that mixes two things: when the call's host work outlasts the
flush queued before it, the GPU idles between the events and they time the wait.  ncu
(profile_kernels.py) sees only the kernels.  Per case this measures both:
- host us: the host's time a call, over N calls issued back to back from an idle GPU with no sync
  between them (N keeps fewer than 900 launches queued, so the host does not wait for the GPU,
  unless one call launches more than that or the case itself syncs: such a row reads host-bound);
- GPU us: the summed device time of the call's kernels, memcpys and memsets (torch.profiler's
  device events over 20 calls); launches: device events a call; the longest kernels;
- back-to-back us: wall clock a call over the same N calls and a final sync (no L2 flush);
- bound: "host" when host us exceeds GPU us, else "GPU".
The host figures are medians of 5 repeats.  Writes OUT_DIR/host-summary.md and .json after every
case.  On a CPU the GPU columns stay empty and every case is host-bound.  torch.compile baselines
are left out unless --with-compile (each compiles for many seconds); so are the e2e and train
suites unless named.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from profile_kernels import short_kernel  # noqa: E402  (this directory is on sys.path, as for any script in it)

DEFAULT_SUITES = ("group_norm", "group_norm_train", "attention", "p_step")
MAX_QUEUED = 900  # launches in flight while the host is timed: CUDA's queue holds about 1024
REPEATS = 5


def device_events(prof) -> List[tuple]:
    """(name, microseconds) of every device-side event (kernel, memcpy, memset) the profiler saw."""
    from torch.autograd import DeviceType

    return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]


def split(fn, device: torch.device, calls: int = 100, profiled: int = 20) -> dict:
    """host_us, gpu_us, launches, back_to_back_us and the longest kernels of fn (see the module doc)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    fn()
    sync()
    gpu_us = launches = None
    top: List[list] = []
    if device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled):
                fn()
            sync()
        events = device_events(prof)
        if not events:  # every case launches something: the profiler could not see the GPU
            raise RuntimeError("torch.profiler recorded no device events (is CUPTI available?)")
        gpu_us = sum(us for _, us in events) / profiled
        launches = len(events) / profiled
        per_kernel: Dict[str, float] = defaultdict(float)
        for name, us in events:
            per_kernel[name] += us / profiled
        longest = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:3]
        top = [[short_kernel(name).strip() or name, round(us, 2)] for name, us in longest]
    n = calls if not launches else max(1, min(calls, int(MAX_QUEUED // launches)))
    host, wall = [], []
    for _ in range(REPEATS):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) / n * 1e6)
        wall.append((t2 - t0) / n * 1e6)
    host_us = statistics.median(host)
    return dict(host_us=host_us, gpu_us=gpu_us, launches=launches, back_to_back_us=statistics.median(wall),
                bound="host" if gpu_us is None or host_us > gpu_us else "GPU", calls=n, top=top)


def rows(suites: Sequence[str], device: torch.device, quick: bool, impl: Optional[str], with_compile: bool,
         calls: int, echo=print) -> Iterator[dict]:
    """A row per case of the named bench suites whose impl matches: its figures, or why it failed."""
    from ddpm_fast.bench import SUITES

    for suite in suites:
        for case in SUITES[suite](suite, device, quick):
            if (impl and not re.search(impl, case.impl)) or (not with_compile and "torch.compile" in case.impl):
                continue
            row = dict(op=case.op, size=case.size, impl=case.impl, dtype=str(case.dtype).replace("torch.", ""))
            try:
                row.update(split(case.fn, device, calls), status="ok")
            except Exception as e:  # a case that cannot run here is a row that says so; the rest go on
                first = str(e).strip().splitlines()
                row.update(status=f"failed: {type(e).__name__}" + (f": {first[0][:160]}" if first else ""))
            echo(f"  {row['op']} {row['size']} {row['impl']}: " + (
                f"host {row['host_us']:.1f} us, GPU {_f(row['gpu_us'], '.1f')} us, {_f(row['launches'], '.1f')} "
                f"launches, {row['bound']}-bound" if row["status"] == "ok" else row["status"]))
            yield row


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown(found: List[dict], meta: dict) -> str:
    lines = [f"Device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {(meta['git_commit'] or 'unknown')[:10]}, {meta['date']}",
             f"Command: `{meta['command']}`", "",
             "host us: the host's time a call (calls issued back to back, no sync); GPU us: the call's device "
             "time (torch.profiler); back-to-back us: wall clock a call with a sync at the end of the run.", "",
             "| op | size | impl | dtype | host us | GPU us | launches | back-to-back us | bound | longest kernels "
             "(us a call) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in found:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r['dtype']} | {r['status']} | | | | | |")
            continue
        top = "; ".join(f"`{name}` {us:.1f}" for name, us in r["top"])
        lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r['dtype']} | {r['host_us']:.1f} | "
                     f"{_f(r['gpu_us'], '.1f')} | {_f(r['launches'], '.1f')} | {r['back_to_back_us']:.1f} | "
                     f"{r['bound']} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    from ddpm_fast.bench import SUITES
    from ddpm_fast.bench.harness import metadata

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="where host-summary.md and .json go")
    p.add_argument("--suites", default=",".join(DEFAULT_SUITES),
                   help=f"comma-separated bench suites (default {','.join(DEFAULT_SUITES)}; from {', '.join(SUITES)})")
    p.add_argument("--full", action="store_true", help="the full run's sizes (default: --quick's)")
    p.add_argument("--impl", help="only the cases whose impl matches this regular expression")
    p.add_argument("--with-compile", action="store_true", help="include the torch.compile baselines")
    p.add_argument("--calls", type=int, default=100, help="calls a timed run (default 100; fewer to keep "
                   f"{MAX_QUEUED} launches queued at most)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    a = p.parse_args(argv)
    suites = [s.strip() for s in a.suites.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        p.error(f"--suites: unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}" if unknown
                else "--suites: name at least one suite")
    if a.calls < 1:
        p.error(f"--calls: expected a positive int, got {a.calls}")
    if a.impl:
        try:
            re.compile(a.impl)
        except re.error as e:
            p.error(f"--impl: not a regular expression ({e})")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda asked for, but no CUDA GPU is visible")
    meta = metadata(device, " ".join(["python benchmarks/profile_host.py"] + list(argv if argv is not None
                                                                                     else sys.argv[1:])))
    os.makedirs(a.out_dir, exist_ok=True)
    found: List[dict] = []

    def write():
        with open(os.path.join(a.out_dir, "host-summary.json"), "w") as fh:
            json.dump(dict(meta=meta, rows=found), fh, indent=1, default=str)
        with open(os.path.join(a.out_dir, "host-summary.md"), "w") as fh:
            fh.write(markdown(found, meta))

    try:
        for row in rows(suites, device, not a.full, a.impl, a.with_compile, a.calls):
            found.append(row)
            write()  # after every case: an interrupted run keeps what it measured
    except KeyboardInterrupt:
        print(f"interrupted after {len(found)} cases; they are in {a.out_dir}/host-summary.md", file=sys.stderr)
        return 130
    write()
    print(markdown(found, meta), end="")
    print(f"wrote {os.path.join(a.out_dir, 'host-summary.md')}")
    return 1 if any(r["status"] != "ok" for r in found) else 0


if __name__ == "__main__":
    sys.exit(main())
