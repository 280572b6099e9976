"""Nsight Compute over one call of each fused kernel at the benchmarks' shapes, and the key figures of
every launch in one table.

    python benchmarks/profile_kernels.py OUT_DIR [--cases NAME,...] [--ncu PATH]   # a GPU machine with ncu
    python benchmarks/profile_kernels.py --summarize OUT_DIR   # the table again, from OUT_DIR/ncu-*.csv
    python benchmarks/profile_kernels.py --list

Each case runs in a process of its own under `ncu --profile-from-start off --clock-control none`
(the clocks left as they are, as the benchmarks run): two warm-up calls (compilation, lazy
initialisation), then one call between cudaProfilerStart and cudaProfilerStop, so that only its
launches are profiled.  ncu's CSV for case NAME goes to OUT_DIR/ncu-NAME.csv (its stderr to
ncu-NAME.log); the table of every launch goes to OUT_DIR/ncu-summary.md and .json: duration, DRAM and
SM throughput as % of peak, DRAM GB/s, achieved and theoretical occupancy, registers, grid x block,
shared memory, and warp cycles per issued instruction.  Exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional

SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "MemoryWorkloadAnalysis")
# (section name as ncu prints it, metric name) -> the summary's field
FIELDS = {
    ("GPU Speed Of Light Throughput", "Duration"): "duration_us",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_pct",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_pct",
    ("Memory Workload Analysis", "Memory Throughput"): "dram_gbps",
    ("Launch Statistics", "Registers Per Thread"): "registers",
    ("Launch Statistics", "Grid Size"): "grid",
    ("Launch Statistics", "Block Size"): "block",
    ("Launch Statistics", "Dynamic Shared Memory Per Block"): "dyn_smem",
    ("Launch Statistics", "Static Shared Memory Per Block"): "static_smem",
    ("Occupancy", "Theoretical Occupancy"): "theoretical_occupancy_pct",
    ("Occupancy", "Achieved Occupancy"): "achieved_occupancy_pct",
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"): "cycles_per_issue",
}
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6,
              "second": 1e6}
RATE_UNITS = {"byte/second": 1e-9, "Kbyte/second": 1e-6, "Mbyte/second": 1e-3, "Gbyte/second": 1.0,
              "Tbyte/second": 1e3, "B/s": 1e-9, "KB/s": 1e-6, "MB/s": 1e-3, "GB/s": 1.0, "TB/s": 1e3}
SIZE_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "B": 1, "KB": 1e3, "MB": 1e6, "KiB": 1024, "MiB": 1 << 20}


# ------------------------------------------------------------------------------ the cases
def _cases() -> Dict[str, Callable[[], Callable[[], object]]]:
    """name -> a builder of the call: inputs made on the GPU before the profiled region."""
    import torch

    import ddpm_fast as df

    def tensors(*shapes, dtype):
        return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]

    sched = df.NoiseSchedule.linear(1000)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out: Dict[str, Callable[[], Callable[[], object]]] = {}
    for backend in ("cuda", "triton"):
        for dt, shape in (("fp32", (16, 4, 512, 512)), ("bf16", (256, 3, 32, 32))):
            size = "x".join(map(str, shape))

            def p_step(b=backend, s=shape, d=dtypes[dt]):
                x, eps = tensors(s, s, dtype=d)
                return lambda: df.p_step(x, eps, 500, sched, seed=1, backend=b)

            def q_sample(b=backend, s=shape, d=dtypes[dt]):
                (x,) = tensors(s, dtype=d)
                return lambda: df.q_sample(x, 500, sched, seed=1, backend=b)
            out[f"p_step-{backend}-{dt}-{size}"] = p_step
            out[f"q_sample-{backend}-{dt}-{size}"] = q_sample
        # The CIFAR U-Net's first and third levels; on CUDA also the first in fp32 (the H200 record had
        # bf16 there slower than fp32, on half the bytes) and at batch 1 (the split path, 4.5x eager's time).
        shapes = [("bf16", (256, 128, 32, 32)), ("bf16", (64, 256, 8, 8))]
        if backend == "cuda":
            shapes += [("fp32", (256, 128, 32, 32)), ("bf16", (1, 128, 32, 32))]
        for dt, shape in shapes:
            def group_norm(b=backend, s=shape, d=dtypes[dt]):
                x, w, bias = tensors(s, s[1:2], s[1:2], dtype=d)
                return lambda: df.group_norm(x, 32, w, bias, 1e-6, silu=True, backend=b)
            out[f"group_norm-{backend}-{dt}-{'x'.join(map(str, shape))}"] = group_norm

        def group_norm_train(b=backend, s=(128, 128, 32, 32)):
            """ResBlock's norm2 forward and backward at the paper's training batch."""
            x, w, bias, temb, dy = tensors(s, s[1:2], s[1:2], s[:2], s, dtype=torch.bfloat16)
            leaves = [t.requires_grad_() for t in (x, w, bias, temb)]
            return lambda: torch.autograd.grad(
                df.group_norm(x, 32, w, bias, 1e-6, add=temb, silu=True, backend=b), leaves, dy)
        out[f"group_norm_train-{backend}-bf16-128x128x32x32"] = group_norm_train

        def attention(b=backend):
            q, k, v = tensors(*3 * [(64, 1, 256, 256)], dtype=torch.bfloat16)  # DDPM CIFAR's 16x16 level, d = 256
            return lambda: df.attention(q, k, v, backend=b)
        out[f"attention-{backend}-bf16-64x1x256x256"] = attention
    return out


def run_case(name: str) -> int:
    """The process ncu watches: warm up, then one call between cudaProfilerStart and Stop."""
    import torch

    cases = _cases()
    if name not in cases:
        print(f"profile_kernels.py: no case {name!r}", file=sys.stderr)
        return 2
    fn = cases[name]()
    fn()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


# ------------------------------------------------------------------------------ ncu's CSV
def _number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None  # "n/a", or a tuple such as a grid "(16, 1, 1)"


def _value(field: str, unit: str, text: str):
    if field in ("grid", "block"):
        n = _number(text)
        return int(n) if n is not None else text.strip()
    n = _number(text)
    if n is None:
        return None
    if field == "duration_us":
        return n * TIME_UNITS[unit] if unit in TIME_UNITS else None
    if field == "dram_gbps":
        return n * RATE_UNITS[unit] if unit in RATE_UNITS else None
    if field in ("dyn_smem", "static_smem"):
        return n * SIZE_UNITS.get(unit.split("/")[0], 1)  # "Kbyte/block"
    return n


def short_kernel(name: str) -> str:
    """A demangled name without its return type, namespaces and parameter list: 'gn_onchip<bf16, 4>'."""
    name = re.sub(r"^void ", "", name.strip())
    depth, cut = 0, len(name)
    for i in range(len(name) - 1, -1, -1):  # the last top-level "(...)" is the parameter list
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if name[i] == "(" and depth == 0:
            cut = i
            break
    name = name[:cut] if cut > 0 else name
    name = re.sub(r"\b[A-Za-z_]\w*::|\(anonymous namespace\)::", "", name)
    return re.sub(r"\bHalf\b", "fp16", re.sub(r"\bBFloat16\b", "bf16", name))[:90]


def parse_ncu_csv(text: str, case: str) -> List[dict]:
    """One dict per profiled launch, in launch order: case, id, kernel and the FIELDS found."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    launches: Dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if not (row.get("ID") or "").isdigit() or row.get("Metric Name") is None:
            continue  # a line ncu or the program printed after the header
        launch = launches.setdefault(row["ID"], dict(case=case, id=int(row["ID"]),
                                                     kernel=short_kernel(row.get("Kernel Name", ""))))
        field = FIELDS.get((row.get("Section Name"), row["Metric Name"]))
        if field is not None:
            launch[field] = _value(field, row.get("Metric Unit") or "", row.get("Metric Value") or "")
    return sorted(launches.values(), key=lambda r: r["id"])


def markdown(launches: List[dict], failed: Dict[str, str]) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| case | kernel | us | DRAM % | DRAM GB/s | SM % | occupancy achieved / theoretical | regs | "
             "grid x block | smem B (dyn + static) | cycles per issue |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in launches:
        g = r.get
        smem = "" if g("dyn_smem") is None else f"{g('dyn_smem'):.0f} + {g('static_smem') or 0:.0f}"
        occupancy = f"{f(g('achieved_occupancy_pct'), '.1f')} / {f(g('theoretical_occupancy_pct'), '.1f')}"
        lines.append(f"| {r['case']} | `{r['kernel']}` | {f(g('duration_us'), '.1f')} | {f(g('dram_pct'), '.1f')} | "
                     f"{f(g('dram_gbps'), '.0f')} | {f(g('sm_pct'), '.1f')} | {occupancy} | "
                     f"{f(g('registers'), '.0f')} | "
                     f"{g('grid', '')} x {g('block', '')} | {smem} | {f(g('cycles_per_issue'), '.1f')} |")
    lines += [f"| {case} | failed: {why} | | | | | | | | | |" for case, why in failed.items()]
    return "\n".join(lines) + "\n"


def summarize(out_dir: str, failed: Optional[Dict[str, str]] = None) -> List[dict]:
    """Parse every OUT_DIR/ncu-*.csv, write ncu-summary.md and .json; the launches, in case order."""
    launches = []
    for fname in sorted(os.listdir(out_dir)):
        m = re.fullmatch(r"ncu-(.+)\.csv", fname)
        if m:
            with open(os.path.join(out_dir, fname)) as fh:
                launches += parse_ncu_csv(fh.read(), m.group(1))
    failed = dict(failed or {})
    with open(os.path.join(out_dir, "ncu-summary.json"), "w") as fh:
        json.dump(dict(launches=launches, failed=failed), fh, indent=1)
    with open(os.path.join(out_dir, "ncu-summary.md"), "w") as fh:
        fh.write(markdown(launches, failed))
    return launches


def profile(out_dir: str, names: List[str], ncu: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    failed = {}
    for name in names:
        csv_path, log_path = (os.path.join(out_dir, f"ncu-{name}.{ext}") for ext in ("csv", "log"))
        cmd = [ncu, "--csv", "--page", "details", "--clock-control", "none", "--profile-from-start", "off",
               *[a for s in SECTIONS for a in ("--section", s)], sys.executable, os.path.abspath(__file__),
               "--run", name]
        print("+ " + " ".join(cmd), flush=True)
        with open(csv_path, "w") as out, open(log_path, "w") as err:
            rc = subprocess.run(cmd, stdout=out, stderr=err).returncode
        with open(csv_path) as fh:
            found = parse_ncu_csv(fh.read(), name)
        if rc != 0 or not found:
            with open(log_path) as fh:
                errors = [line.strip() for line in fh if "ERROR" in line or "Error" in line]
            failed[name] = f"rc {rc}, {len(found)} launches" + (f": {errors[-1][:200]}" if errors else "")
            print(f"  {name}: FAILED ({failed[name]})", flush=True)
        else:
            print(f"  {name}: {len(found)} launches, " + ", ".join(r["kernel"] for r in found), flush=True)
    summarize(out_dir, failed)
    print(f"wrote {os.path.join(out_dir, 'ncu-summary.md')}")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", help="where the CSVs and the summary go")
    p.add_argument("--cases", help="comma-separated case names (default: all; --list names them)")
    p.add_argument("--ncu", default="ncu", help="the ncu executable (default: ncu on PATH)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--summarize", action="store_true", help="rebuild OUT_DIR's summary from its CSVs")
    p.add_argument("--run", metavar="CASE", help=argparse.SUPPRESS)  # the process ncu profiles
    a = p.parse_args(argv)
    if a.run:
        return run_case(a.run)
    if a.list:
        print("\n".join(_case_names()))
        return 0
    if not a.out_dir:
        p.error("out_dir: required (or --list)")
    if a.summarize:
        if not os.path.isdir(a.out_dir):
            p.error(f"out_dir: {a.out_dir} is not a directory")
        previous = os.path.join(a.out_dir, "ncu-summary.json")
        failed = json.load(open(previous)).get("failed", {}) if os.path.exists(previous) else {}
        summarize(a.out_dir, failed)
        print(open(os.path.join(a.out_dir, "ncu-summary.md")).read(), end="")
        return 0
    names = _case_names()
    if a.cases:
        chosen = [c.strip() for c in a.cases.split(",")]
        unknown = [c for c in chosen if c not in names]
        if unknown:
            p.error(f"--cases: no case {unknown[0]!r} (--list names them)")
        names = chosen
    return profile(a.out_dir, names, a.ncu)


def _case_names() -> List[str]:
    """The case names, without touching the GPU (the builders run only in the profiled process)."""
    return list(_cases())


if __name__ == "__main__":
    sys.exit(main())
