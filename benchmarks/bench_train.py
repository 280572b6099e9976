"""A training step of the CIFAR-10 U-Net (fwd + bwd + Adam): eager fp32 / bf16, torch.compile, and ours."""

import pytest
from conftest import DEVICE, QUICK, case_id, run_case

from ddpm_fast.bench import train

CASES = list(train.cases("train", DEVICE, QUICK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_train(benchmark, case):
    run_case(benchmark, case)
