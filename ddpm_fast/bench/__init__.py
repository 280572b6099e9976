"""Benchmarks: the harness, the per-op cases, and the runner behind `ddpm-fast bench`."""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import torch

from . import attention, diffusion, e2e, group_norm
from .harness import Row, finish_rows, measure_floors, metadata, time_fn, write_results

SUITES = {"q_sample": diffusion.cases, "p_step": diffusion.cases, "group_norm": group_norm.cases,
          "attention": attention.cases, "e2e": e2e.cases}


def run(ops: Optional[Sequence[str]] = None, quick: bool = False, out_dir: Optional[str] = "benchmarks/results",
        device: Optional[str] = None, command: Optional[str] = None, echo=print) -> Dict[str, object]:
    """Run the named suites (all by default) on one device; print a table, write the result files."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = list(ops or SUITES)
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        raise ValueError(f"only: unknown benchmark {unknown[0]!r}; choose from {', '.join(SUITES)}")
    echo(f"measuring floors on {dev} ...")
    floors = measure_floors(dev, quick)
    rows: List[Row] = []
    for op in ops:
        for case in SUITES[op](op, dev, quick):
            echo(f"  {case.op:10s} {case.size:14s} {case.impl}")
            timing = time_fn(case.fn, dev, min_time_s=0.1 if quick else 0.3)
            rows.append(Row(op=case.op, size=case.size, impl=case.impl, numel=case.numel,
                            dtype=str(case.dtype).replace("torch.", ""), bytes=case.bytes, flops=case.flops,
                            baseline=case.baseline, steps=case.steps, images=case.images, **timing))
    finish_rows(rows, floors)
    meta = metadata(dev, command or " ".join(["ddpm-fast"] + sys.argv[1:]))
    from .harness import markdown

    echo(markdown(rows, floors, meta))
    paths = None
    if out_dir:
        paths = write_results(f"bench-{dev.type}{'-quick' if quick else ''}", rows, floors, meta, out_dir)
        echo("wrote " + ", ".join(paths.values()))
    return {"rows": rows, "floors": floors, "meta": meta, "paths": paths}


__all__ = ["Row", "run", "time_fn", "measure_floors", "metadata", "write_results", "finish_rows"]
