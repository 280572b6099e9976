"""p_step against diffusers, the eager reference and torch.compile of the reference."""

import pytest
from conftest import DEVICE, QUICK, case_id, run_case

from ddpm_fast.bench import diffusion

CASES = list(diffusion.cases("p_step", DEVICE, QUICK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_p_step(benchmark, case):
    run_case(benchmark, case)
