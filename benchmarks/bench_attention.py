"""Attention: the core op against SDPA's backends, and the fused block against diffusers and torch.compile."""

import pytest
from conftest import DEVICE, QUICK, case_id, run_case

from ddpm_fast.bench import attention

CASES = list(attention.cases("attention", DEVICE, QUICK))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention(benchmark, case):
    run_case(benchmark, case)
