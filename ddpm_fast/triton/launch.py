"""Launch geometry and device shared by the Triton launchers.

CUDA caps a grid's y and z dimensions at 65535 blocks.  The kernels that put the batch (samples,
images, batch x heads) on grid axis 1 take its first index as an argument; their launchers cover a
larger batch with one launch per chunk of GRID_Y.

Triton launches on the current CUDA device and its current stream, not on the tensors' device:
every launcher runs under on_device, with its first tensor argument's device made current.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Tuple, TypeVar

import torch

GRID_Y = 65535
F = TypeVar("F", bound=Callable)


def on_device(launcher: F) -> F:
    """launcher, run with the device of its first tensor argument current (when that is a GPU)."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        if not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return run  # type: ignore[return-value]


def batch_chunks(n: int) -> List[Tuple[int, int]]:
    """(first index, count) of each launch over a batch of n."""
    return [(first, min(GRID_Y, n - first)) for first in range(0, n, GRID_Y)]
