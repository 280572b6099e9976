"""What a bench record says against the project's performance targets, and which kernel each op
should run by default:

    python -m ddpm_fast.bench.targets benchmarks/results/bench-cuda.json [more.json ...]

The targets are for an H100/H200, each a ratio measured in one run (ours against a baseline, or
against the run's own copy and matmul floors); a row the record lacks is "not measured", never a
pass.  The backend choice reads the "backends" suite: per op and dtype the kernel with the lower
geometric-mean time over the suite's shapes, next to the one backend="auto" takes now (the first of
ops.KERNELS[op] that the record measured).  The bench writes both into its Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .. import ops
from .group_norm import LEVELS

LARGE = 16_000_000  # elements: "at >= 16M elements"
CIFAR_LEVELS = tuple(label for label, _, _ in LEVELS)
# batch 256, bf16, CUDA graphs on, in either layout (the faster row counts)
E2E = ("b256", ("DDPMSampler bfloat16 graphs", "DDPMSampler bfloat16 graphs channels_last"))
EAGER_PIPELINE = "diffusers DDPMPipeline fp32"
COMPILED_PIPELINE = "diffusers + torch.compile(max-autotune) bf16"

Measured = Optional[Tuple[float, str]]  # (value, which row), None where the record has no such row


def _ok(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _ours(rows: List[dict], op: str, size: str) -> Optional[dict]:
    """The fastest of our implementations at (op, size)."""
    mine = [r for r in _ok(rows) if r["op"] == op and r["size"] == size and not r["baseline"]]
    return min(mine, key=lambda r: r["median_ms"]) if mine else None


def _worst(found: List[Tuple[float, str]]) -> Measured:
    return min(found) if found else None


def _sizes(rows: List[dict], op: str, keep: Callable[[dict], bool]) -> List[str]:
    return list(dict.fromkeys(r["size"] for r in _ok(rows) if r["op"] == op and keep(r)))


def _copy_fraction(op: str) -> Callable[[List[dict]], Measured]:
    def measure(rows):
        best = [_ours(rows, op, s) for s in _sizes(rows, op, lambda r: r["numel"] >= LARGE)]
        return _worst([(r["frac_copy_floor"], f"{r['impl']} at {r['size']}") for r in best if r])
    return measure


def _speedup(op: str, baselines: Tuple[str, ...], keep: Callable[[dict], bool]) -> Callable[[List[dict]], Measured]:
    """Worst over the kept sizes of (the slowest of the named baselines' time) / (our fastest time)."""
    def measure(rows):
        found = []
        for s in _sizes(rows, op, keep):
            r = _ours(rows, op, s)
            ratios = [r["vs"][b] for b in baselines if r and b in r["vs"]]
            if ratios:
                found.append((min(ratios), f"{r['impl']} at {r['size']}"))
        return _worst(found)
    return measure


def _gn_fraction(rows):
    best = [_ours(rows, "group_norm", s) for s in _sizes(rows, "group_norm", _cifar_gn(64))]
    return _worst([(r["frac_copy_floor"], f"{r['impl']} at {r['size']}") for r in best if r])


def _cifar_gn(min_batch: int, max_batch: int = 1 << 30) -> Callable[[dict], bool]:
    def keep(r):
        batch, rest = r["size"].split("x", 1)
        return min_batch <= int(batch) <= max_batch and rest.split(" ")[0] in CIFAR_LEVELS
    return keep


def _sdpa_best(rows):
    """Our attention core over the fastest SDPA backend at DDPM CIFAR's shape (d = 256, L = 256)."""
    found = []
    for s in _sizes(rows, "attention", lambda r: r["size"].startswith("cifar") and r["dtype"] == "bfloat16"):
        r = _ours(rows, "attention", s)
        sdpa = [v for k, v in (r["vs"] if r else {}).items() if k.startswith("SDPA")]
        if sdpa:
            found.append((min(sdpa), f"{r['impl']} at {r['size']}"))
    return _worst(found)


def _e2e(field: Optional[str] = None, baseline: Optional[str] = None):
    def measure(rows):
        size, impls = E2E
        found = [r for r in _ok(rows) if r["op"] == "e2e" and r["size"] == size and r["impl"] in impls]
        if not found:
            return None
        r = min(found, key=lambda r: r["median_ms"])
        value = r.get(field) if field else r["vs"].get(baseline)
        return None if value is None else (value, f"{r['impl']} at {size}")
    return measure


@dataclass(frozen=True)
class Target:
    name: str
    goal: float
    unit: str  # "x": a ratio of times; "%": a fraction of a floor
    measure: Callable[[List[dict]], Measured]


TARGETS = [
    Target("p_step: copy bandwidth at >= 16M elements", 0.90, "%", _copy_fraction("p_step")),
    Target("q_sample: copy bandwidth at >= 16M elements", 0.90, "%", _copy_fraction("q_sample")),
    Target("p_step over diffusers' step, 256x3x32x32", 10.0, "x",
           _speedup("p_step", ("diffusers step",), lambda r: r["size"] == "256x3x32x32")),
    Target("p_step over torch.compile(reference), 256x3x32x32", 1.3, "x",
           _speedup("p_step", ("torch.compile(reference)",), lambda r: r["size"] == "256x3x32x32")),
    Target("GroupNorm+SiLU: copy bandwidth, CIFAR shapes, batch >= 64", 0.80, "%", _gn_fraction),
    Target("GroupNorm+SiLU over eager, CIFAR shapes, batch >= 64", 2.0, "x",
           _speedup("group_norm", ("eager GN+SiLU",), _cifar_gn(64))),
    Target("GroupNorm+SiLU over torch.compile, CIFAR shapes, batch >= 64", 1.2, "x",
           _speedup("group_norm", ("torch.compile(GN+SiLU)",), _cifar_gn(64))),
    Target("GroupNorm+SiLU over eager, CIFAR shapes, batch 1", 1.0, "x",
           _speedup("group_norm", ("eager GN+SiLU",), _cifar_gn(1, 1))),
    Target("attention core over SDPA's fastest backend, bf16, d=256, L=256", 1.0, "x", _sdpa_best),
    Target("attention block over diffusers' eager block", 1.5, "x",
           _speedup("attention block", ("diffusers eager block",), lambda r: r["dtype"] == "bfloat16")),
    Target("sampling, b256 bf16 graphs, over diffusers DDPMPipeline fp32", 8.0, "x", _e2e(baseline=EAGER_PIPELINE)),
    Target("sampling, b256 bf16 graphs, over torch.compile(max-autotune) diffusers", 1.5, "x",
           _e2e(baseline=COMPILED_PIPELINE)),
    Target("sampling, b256 bf16 graphs: MFU against the bf16 matmul floor", 0.40, "%",
           _e2e(field="frac_matmul_floor")),
    Target("sampling latency, b1, over diffusers DDPMPipeline fp32", 10.0, "x",
           _speedup("e2e", (EAGER_PIPELINE,), lambda r: r["size"] == "b1")),
]


def evaluate(rows: List[dict]) -> List[dict]:
    """One dict per target: name, goal, unit, measured (None: not in the record), where, status."""
    out = []
    for t in TARGETS:
        m = t.measure(rows)
        status = "not measured" if m is None else ("met" if m[0] >= t.goal else "missed")
        out.append(dict(name=t.name, goal=t.goal, unit=t.unit, measured=None if m is None else m[0],
                        where=None if m is None else m[1], status=status))
    return out


def backend_choice(rows: List[dict]) -> List[dict]:
    """Per (op, dtype) of the backends suite: the measured backends' geometric-mean ms over the shapes
    they all ran, the fastest, its margin over the next, and what auto takes now."""
    times: Dict[Tuple[str, str], Dict[str, Dict[str, float]]] = {}
    for r in _ok(rows):
        if r["op"] != "backends":
            continue
        op, dtype, shape = r["size"].split(" ")
        backend = r["impl"][len("ddpm_fast["):-1]
        times.setdefault((op, dtype), {}).setdefault(backend, {})[shape] = r["median_ms"]
    out = []
    for (op, dtype), per in times.items():
        shared = set.intersection(*(set(s) for s in per.values()))
        if not shared:
            continue
        mean = {b: math.exp(sum(math.log(s[k]) for k in shared) / len(shared)) for b, s in per.items()}
        ranked = sorted(mean, key=mean.get)
        auto = next((b for b in ops.KERNELS.get(op, ()) if b in mean), ranked[0])
        out.append(dict(op=op, dtype=dtype, ms=mean, fastest=ranked[0], shapes=len(shared),
                        margin=mean[ranked[1]] / mean[ranked[0]] if len(ranked) > 1 else None, auto=auto))
    return out


def markdown(rows: List[dict], on_gpu: bool) -> List[str]:
    """The bench Markdown's sections: the targets (on a GPU record) and the backend choice."""
    lines = []
    if on_gpu:
        lines += ["", "Targets (the project's, for an H100/H200; each ratio from rows of one run):", "",
                  "| target | measured | goal | status | row |", "| --- | ---: | ---: | --- | --- |"]
        for t in evaluate(rows):
            fmt = (lambda v: f"{100 * v:.1f}%") if t["unit"] == "%" else (lambda v: f"{v:.2f}x")
            measured = "" if t["measured"] is None else fmt(t["measured"])
            lines.append(f"| {t['name']} | {measured} | {fmt(t['goal'])} | {t['status']} | {t['where'] or ''} |")
    choice = [c for c in backend_choice(rows) if len(c["ms"]) > 1]  # a choice only where two kernels ran
    if choice:
        lines += ["", "Backend choice (the backends rows: geometric-mean ms over the shapes each op ran):", "",
                  "| op | dtype | ms per backend | fastest | by | auto takes now |",
                  "| --- | --- | --- | --- | ---: | --- |"]
        for c in choice:
            ms = ", ".join(f"{b} {t:.4f}" for b, t in sorted(c["ms"].items()))
            by = "" if c["margin"] is None else f"{c['margin']:.2f}x"
            auto = c["auto"] if c["auto"] == c["fastest"] else f"{c['auto']} (the record says {c['fastest']})"
            lines.append(f"| {c['op']} | {c['dtype']} | {ms} | {c['fastest']} | {by} | {auto} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", help="bench JSON files (ddpm-fast bench writes bench-<device>[-quick].json); "
                   "several runs that measured different suites are read together")
    a = p.parse_args(argv)
    rows = []
    for path in a.records:
        try:
            with open(path) as f:
                d = json.load(f)
            rows += d["rows"]
            m = d["meta"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"records: cannot read a bench record from {path}: {e}")
        print(f"{path}: {m.get('device_name')} ({m.get('device')}), commit {str(m.get('git_commit'))[:10]}, "
              f"{m.get('date')}")
    print("\n".join(markdown(rows, on_gpu=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
