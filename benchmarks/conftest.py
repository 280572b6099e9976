"""pytest-benchmark front end over the cases in ddpm_fast.bench (the same ones `ddpm-fast bench` runs).

    pytest benchmarks/ --benchmark-only                 # every size
    DDPM_FAST_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only
"""

import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("DDPM_FAST_BENCH_QUICK") == "1"


def run_case(benchmark, case):
    benchmark.extra_info.update(op=case.op, size=case.size, impl=case.impl, bytes=case.bytes, flops=case.flops,
                                numel=case.numel, dtype=str(case.dtype), device=str(DEVICE))
    if DEVICE.type == "cuda":
        def fn():
            case.fn()
            torch.cuda.synchronize()
    else:
        fn = case.fn
    benchmark(fn)


def case_id(case):
    return f"{case.size}-{case.impl}"


@pytest.fixture
def device():
    return DEVICE
