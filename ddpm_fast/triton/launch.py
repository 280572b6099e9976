"""Launch geometry shared by the Triton launchers.

CUDA caps a grid's y and z dimensions at 65535 blocks.  The kernels that put the batch (samples,
images, batch x heads) on grid axis 1 take its first index as an argument; their launchers cover a
larger batch with one launch per chunk of GRID_Y.
"""

from __future__ import annotations

from typing import List, Tuple

GRID_Y = 65535


def batch_chunks(n: int) -> List[Tuple[int, int]]:
    """(first index, count) of each launch over a batch of n."""
    return [(first, min(GRID_Y, n - first)) for first in range(0, n, GRID_Y)]
