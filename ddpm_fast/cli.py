"""ddpm-fast command line: `info` (versions, devices, backends) and `bench` (benchmarks)."""

from __future__ import annotations

import argparse
import json
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
    run(only, quick=args.quick, out_dir=args.out, device=args.device,
        command="ddpm-fast " + " ".join(sys.argv[1:]))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm-fast", description="Fast DDPM kernels and sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which backends can run here")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="benchmark the ops against eager, torch.compile and diffusers")
    bench.add_argument("--quick", action="store_true", help="two sizes, short timing (under 2 minutes on 2 CPU cores)")
    bench.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    bench.add_argument("--out", default="benchmarks/results", help="directory for the JSON/Markdown/PNG results")
    bench.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
