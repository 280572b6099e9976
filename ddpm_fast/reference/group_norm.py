"""y = act(GroupNorm(x + add) * (1 + scale) + shift), statistics in fp32 (fp64 for fp64 input).

add, scale and shift are per (sample, channel) [B, C] and broadcast over the spatial dims:
add is the DDPM ResBlock's time embedding before norm2, scale/shift improved DDPM's
scale-shift norm.  act is SiLU when ``silu`` is set.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks


def check_group_norm(x, num_groups, weight, bias, eps, add, scale, shift):
    _checks.tensor(x, "x", ndim_min=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
    B, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"num_groups: the {C} channels of x are not divisible by num_groups={num_groups}")
    _checks.positive_float(eps, "eps")
    _checks.affine(weight, "weight", C, x)
    _checks.affine(bias, "bias", C, x)
    for name, v in (("add", add), ("scale", scale), ("shift", shift)):
        _checks.per_channel(v, name, B, C, x)


def group_norm_math(x, num_groups, weight, bias, eps, add, scale, shift, silu):
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C = x.shape[:2]
    bcast = (B, C) + (1,) * (x.dim() - 2)
    h = x.to(cd)
    if add is not None:
        h = h + add.to(cd).reshape(bcast)
    # Shift each group by its pivot, the kernels' (csrc/include/ddpm_fast/group_norm.h): of its values
    # at (channel 0, position 0), (Cg / 2, HW / 2) and (Cg - 1, HW - 1), the median.  x - pivot is exact
    # for nearby floats; then two passes: stable for a large mean and a small spread, where fp32 sums
    # of x itself lose the spread's digits.
    cg = C // num_groups
    hw = h[0, 0].numel() if B and C else 0
    g = h.reshape(B, num_groups, cg, hw)
    if g.numel():
        a, b, c = g[:, :, [0, cg // 2, cg - 1], [0, hw // 2, hw - 1]].unbind(-1)
        # The median of three by min and max: Tensor.median raises on CUDA under deterministic algorithms.
        g = g - torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))[..., None, None]
    g = g.reshape(B, num_groups, -1)
    centred = g - g.mean(-1, keepdim=True)
    h = (centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)).reshape(h.shape)
    if weight is not None:
        h = h * weight.to(cd).reshape((1, C) + (1,) * (x.dim() - 2))
    if bias is not None:
        h = h + bias.to(cd).reshape((1, C) + (1,) * (x.dim() - 2))
    if scale is not None:
        h = h * (1 + scale.to(cd).reshape(bcast))
    if shift is not None:
        h = h + shift.to(cd).reshape(bcast)
    if silu:
        h = F.silu(h)
    return h.to(x.dtype)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    add: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    silu: bool = False,
) -> torch.Tensor:
    check_group_norm(x, num_groups, weight, bias, eps, add, scale, shift)
    return group_norm_math(x, num_groups, weight, bias, eps, add, scale, shift, silu)
