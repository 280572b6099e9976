"""Benchmarks: the harness, the per-op cases, and the runner behind `ddpm-fast bench`."""

from __future__ import annotations

import os
import sys
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from . import attention, backends, diffusion, e2e, group_norm, harness, train
from .harness import Row, failure, finish_rows, measure_floors, metadata, time_fn, write_json, write_results

SUITES = {"q_sample": diffusion.cases, "p_step": diffusion.cases, "group_norm": group_norm.cases,
          "group_norm_train": group_norm.train_cases, "attention": attention.cases, "backends": backends.cases,
          "e2e": e2e.cases, "train": train.cases}


DEFAULT_OUT = "bench-results"


def run(ops: Optional[Sequence[str]] = None, quick: bool = False, out_dir: Optional[str] = DEFAULT_OUT,
        device: Optional[str] = None, command: Optional[str] = None, echo=print) -> Dict[str, object]:
    """Run the named suites (all by default) on one device; print a table, write the result files.

    A case that raises is kept as a failed row (status "failed: ...") and the run goes on.  The JSON
    is rewritten after every case, so an interrupted run keeps the cases it finished; the Markdown
    and PNG are written at the end, and on the way out of an interrupted run."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = list(ops or SUITES)
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        raise ValueError(f"only: unknown benchmark {unknown[0]!r}; choose from {', '.join(SUITES)}")
    harness.MISSING.clear()
    echo(f"measuring floors on {dev} ...")
    floors = measure_floors(dev, quick)
    meta = metadata(dev, command or " ".join(["ddpm-fast"] + sys.argv[1:]))
    name = f"bench-{dev.type}{'-quick' if quick else ''}"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    rows: List[Row] = []
    paths = None
    try:
        for op in ops:
            for row in _suite_rows(op, dev, quick, echo):
                rows.append(row)
                finish_rows(rows, floors)
                if out_dir:
                    write_json(os.path.join(out_dir, f"{name}.json"), rows, floors, meta)
    finally:
        if out_dir:
            paths = write_results(name, rows, floors, meta, out_dir)
        if harness.MISSING:
            echo(f"not importable, so the cases that need them were skipped: {', '.join(sorted(harness.MISSING))}")
    echo(harness.markdown(rows, floors, meta))
    if paths:
        echo("wrote " + ", ".join(paths.values()))
        if "png" not in paths:
            echo("no PNG plot: it needs matplotlib (pip install matplotlib)")
    failed = sum(r.status != "ok" for r in rows)
    if failed:
        echo(f"{failed} of {len(rows)} cases failed")
    return {"rows": rows, "floors": floors, "meta": meta, "paths": paths}


def _suite_rows(op: str, dev: torch.device, quick: bool, echo) -> Iterator[Row]:
    """A row per case of suite op.  A case that raises while timed becomes a failed row.  A suite
    that raises while building a case cannot be resumed (it is a generator): it ends there, with a
    failed row naming the suite."""
    cases = SUITES[op](op, dev, quick)
    while True:
        try:
            case = next(cases)
        except StopIteration:
            return
        except Exception as e:
            echo(f"  {op}: building its cases {failure(e)}")
            yield Row(op=op, size="-", impl="(building cases)", numel=0, dtype="", bytes=0, flops=0,
                      status=failure(e))
            return
        echo(f"  {case.op:10s} {case.size:14s} {case.impl}")
        try:
            timing, status = time_fn(case.fn, dev, min_time_s=0.1 if quick else 0.3), "ok"
            measured = {"flops": case.flops, **(case.report() if case.report else {})}
        except Exception as e:
            timing, status, measured = {}, failure(e), dict(flops=case.flops)
            echo(f"    {status}")
        yield Row(op=case.op, size=case.size, impl=case.impl, numel=case.numel,
                  dtype=str(case.dtype).replace("torch.", ""), bytes=case.bytes, baseline=case.baseline,
                  steps=case.steps, images=case.images, status=status, **measured, **timing)


__all__ = ["Row", "run", "time_fn", "measure_floors", "metadata", "write_results", "finish_rows"]
