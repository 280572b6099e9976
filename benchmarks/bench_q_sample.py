"""q_sample against diffusers, the eager reference and torch.compile of the reference."""

import pytest
from conftest import DEVICE, QUICK, case_id, run_case

from ddpm_fast.bench import diffusion

CASES = list(diffusion.cases("q_sample", DEVICE, QUICK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_q_sample(benchmark, case):
    run_case(benchmark, case)
