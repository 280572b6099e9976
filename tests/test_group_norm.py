import pytest
import torch
import torch.nn.functional as F

import ddpm_fast as df
from conftest import DTYPES, rel_err


def make(B, C, H, W, gen, dtype, options):
    x = (torch.randn(B, C, H, W, generator=gen) * 2 + 0.5).to(dtype)
    w = torch.randn(C, generator=gen).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype)
    extra = {k: torch.randn(B, C, generator=gen).to(dtype) for k in options}
    return x, w, b, extra


def composed(x, G, w, b, eps, add=None, scale=None, shift=None, silu=False):
    """The definition spelled out with eager float64 torch ops."""
    x = x.double()
    if add is not None:
        x = x + add.double()[:, :, None, None]
    B, C = x.shape[:2]
    g = x.reshape(B, G, -1)
    y = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()).reshape(x.shape)
    y = y * w.double()[None, :, None, None] + b.double()[None, :, None, None]
    if scale is not None:
        y = y * (1 + scale.double()[:, :, None, None])
    if shift is not None:
        y = y + shift.double()[:, :, None, None]
    return F.silu(y) if silu else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,G", [((2, 64, 7, 7), 32), ((1, 12, 1, 1), 4), ((3, 48, 5, 3), 16)])
@pytest.mark.parametrize("options", [(), ("add",), ("scale", "shift"), ("add", "scale", "shift")])
@pytest.mark.parametrize("silu", [False, True])
def test_reference_matches_definition(dtype, shape, G, options, silu, gen):
    x, w, b, extra = make(*shape, gen, dtype, options)
    ref = composed(x, G, w, b, 1e-6, silu=silu, **extra)
    out = df.group_norm(x, G, w, b, 1e-6, silu=silu, **extra)
    eager = F.group_norm(x.float() if dtype != torch.float32 else x, G, w.float(), b.float(), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(out, ref) < tol
    assert torch.isfinite(eager).all()


def test_stable_statistics_with_large_mean(gen):
    x = (1e3 + 1e-2 * torch.randn(2, 32, 8, 8, generator=gen))
    out = df.group_norm(x, 8, eps=1e-6)
    ref = composed(x, 8, torch.ones(32), torch.zeros(32), 1e-6)
    assert rel_err(out, ref) < 1e-3  # float32 input already rounds x to ~6e-5 relative of its spread


def test_channels_last_and_noncontiguous(gen):
    x, w, b, extra = make(2, 32, 6, 6, gen, torch.float32, ("add",))
    ref = df.group_norm(x, 8, w, b, add=extra["add"], silu=True)
    cl = df.group_norm(x.to(memory_format=torch.channels_last), 8, w, b, add=extra["add"], silu=True)
    nc = df.group_norm(x.transpose(2, 3), 8, w, b, add=extra["add"], silu=True).transpose(2, 3)
    assert rel_err(cl, ref) < 1e-6 and rel_err(nc, ref) < 1e-6


@pytest.mark.parametrize("kw,exc,match", [
    (dict(num_groups=5), ValueError, "num_groups"),
    (dict(weight=torch.ones(16)), ValueError, "weight"),
    (dict(bias=torch.ones(32, 1)), ValueError, "bias"),
    (dict(add=torch.ones(2, 16)), ValueError, "add"),
    (dict(scale=torch.ones(32)), ValueError, "scale"),
    (dict(shift=torch.ones(3, 32)), ValueError, "shift"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(x=torch.ones(2, 32, 4, 4, dtype=torch.int64)), TypeError, "x"),
])
def test_bad_input(kw, exc, match):
    args = dict(x=torch.randn(2, 32, 4, 4), num_groups=8)
    args.update(kw)
    with pytest.raises(exc, match=match):
        df.group_norm(**args)
