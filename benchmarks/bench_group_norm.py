"""GroupNorm + SiLU against eager PyTorch and torch.compile."""

import pytest
from conftest import DEVICE, QUICK, case_id, run_case

from ddpm_fast.bench import group_norm

CASES = list(group_norm.cases("group_norm", DEVICE, QUICK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_group_norm(benchmark, case):
    run_case(benchmark, case)
