"""End-to-end sampling with the CIFAR-10 U-Net: diffusers' pipeline, FastDDPMScheduler, accelerate, DDPMSampler."""

import pytest
from conftest import DEVICE, QUICK, case_id, run_case

pytest.importorskip("diffusers")
from ddpm_fast.bench import e2e  # noqa: E402

CASES = list(e2e.cases("e2e", DEVICE, QUICK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_e2e(benchmark, case):
    run_case(benchmark, case)
