"""The GroupNorm family against eager PyTorch and torch.compile: GroupNorm + SiLU forward, and
SiLU(GroupNorm(x + temb)) forward + backward."""

import pytest
from conftest import DEVICE, QUICK, case_id, run_case

from ddpm_fast.bench import group_norm

CASES = list(group_norm.cases("group_norm", DEVICE, QUICK))
TRAIN_CASES = list(group_norm.train_cases("group_norm_train", DEVICE, QUICK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_group_norm(benchmark, case):
    run_case(benchmark, case)


@pytest.mark.parametrize("case", TRAIN_CASES, ids=case_id)
def test_group_norm_train(benchmark, case):
    run_case(benchmark, case)
