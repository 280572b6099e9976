import json
import re

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


# ----------------------------------------------------------------- fused kernels
from conftest import (GPU_KERNEL_BACKENDS, KERNEL_BACKENDS, backend_device, batch_past_int32,  # noqa: E402
                      flash_rule, gn_with_outlier, layout, needs, store_slack)

GN_OPTIONS = [(), ("add",), ("scale", "shift"), ("add", "scale", "shift")]


def offset_view(x, offset):
    """x's values in x's layout, `offset` elements into a fresh buffer: an odd offset leaves the data
    pointer aligned to one element only (the CUDA kernels' scalar fallback), 4 aligns a 16-bit dtype
    to 8 bytes (their 4-value accesses)."""
    if not offset:
        return x
    v = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device).as_strided(x.shape, x.stride(), offset)
    return v.copy_(x)


def gn_kernel_vs_reference(backend, dtype, shape, G, fmt, options, silu, gen, affine=True, split=None, mean=0.0,
                           std=1.0, offset=0, outlier=None):
    dev = backend_device(backend)
    x = torch.randn(shape, generator=gen) * std + mean
    if outlier is not None:
        x = gn_with_outlier(x, G, *outlier)
    x = x.to(dev, dtype)
    x = offset_view(layout(x, fmt), offset)
    C = shape[1]
    w = torch.randn(C, generator=gen).to(dev, dtype) if affine else None
    b = torch.randn(C, generator=gen).to(dev, dtype) if affine else None
    extra = {k: (torch.randn(shape[0], C, generator=gen) * 0.5).to(dev, dtype) for k in options}
    x_in = x.clone()
    if split is None:
        y = df.group_norm(x, G, w, b, 1e-6, silu=silu, backend=backend, **extra)
    else:  # force the on-chip (1) or split (>1) path of the Triton kernel
        from ddpm_fast.triton.group_norm import group_norm as tri

        xc = x.contiguous()
        f32 = {k: v.float() for k, v in extra.items()}
        y = tri(xc, G, w.float() if affine else None, b.float() if affine else None, 1e-6, f32.get("add"),
                f32.get("scale"), f32.get("shift"), silu, False, split=split)[0]
    assert torch.equal(x, x_in)
    d = {k: v.double() for k, v in extra.items()}
    ref = df.reference.group_norm(x.double(), G, None if w is None else w.double(), None if b is None else b.double(),
                                  1e-6, silu=silu, **d)
    eager = df.reference.group_norm(x, G, w, b, 1e-6, silu=silu, **extra)
    assert y.dtype == dtype and y.shape == x.shape
    if fmt == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    err = rel_err(y, ref)
    bound = flash_rule(rel_err(eager, ref), dtype, store_slack(backend, dtype))
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", GN_OPTIONS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_kernel_options(backend, options, silu, fmt, gen, poison):
    gn_kernel_vs_reference(backend, torch.float32, (2, 16, 5, 7), 4, fmt, options, silu, gen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape,G", [((1, 12, 1, 1), 4), ((3, 40, 7, 7), 8), ((2, 64, 8, 8), 32),
                                     ((2, 16, 13, 11), 4)],
                         ids=["hw1-b1", "odd", "cifar-like", "rows-over-64"])
@pytest.mark.parametrize("options", [(), ("add",)], ids=["plain", "add"])
def test_kernel_dtypes_layouts_shapes(backend, dtype, fmt, shape, G, options, gen, poison):
    gn_kernel_vs_reference(backend, dtype, shape, G, fmt, options, True, gen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", [(), ("add",)], ids=["plain", "add"])
def test_kernel_large_mean_small_spread(backend, options, gen, poison):
    gn_kernel_vs_reference(backend, torch.float32, (2, 32, 8, 8), 8, "contiguous", options, False, gen,
                           mean=1e3, std=1e-2)


# One value of every group far from the rest (an activation outlier, 10^4 standard deviations out), at
# each of the values the pivot is chosen from.  Sums of d^2 minus the squared mean lose every digit
# of the variance to it; values centred on it round at its scale.  Small groups take the on-chip
# paths, 18432-value ones the split ones (Triton) and many Welford blocks (CPU).
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("place", ["first", "middle", "last"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G", [((2, 16, 9, 9), 4), ((1, 16, 48, 48), 2)], ids=["small-groups", "large-groups"])
def test_kernel_outlier(backend, dtype, place, fmt, shape, G, gen, poison):
    gn_kernel_vs_reference(backend, dtype, shape, G, fmt, ("add",), False, gen, outlier=(place, 1e4))


def test_reference_outlier(gen):
    """The reference in float32 centres on the same pivot, so one outlier costs it nothing either."""
    x = gn_with_outlier(torch.randn(2, 16, 48, 48, generator=gen), 2, "first", 1e4)
    out = df.group_norm(x, 2, eps=1e-6, backend="reference")
    assert rel_err(out, composed(x, 2, torch.ones(16), torch.zeros(16), 1e-6)) < 1e-6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,G", [((2, 16, 9, 9), 4), ((1, 16, 48, 48), 2)], ids=["small-groups", "large-groups"])
def test_kernel_outlier_below_tied_candidates(backend, fmt, shape, G, gen, poison):
    """Two pivot candidates equal and the third an outlier below them: a median of three that breaks
    the tie the wrong way takes the outlier as the pivot.  The error is measured on the values other
    than the outlier, which it dominates otherwise (about 3e-4 with the outlier as the pivot)."""
    x = gn_with_outlier(gn_with_outlier(torch.randn(shape, generator=gen), G, "first", 0.25), G, "middle", 0.25)
    x = layout(gn_with_outlier(x, G, "last", -1e4), fmt).to(backend_device(backend))
    y = df.group_norm(x, G, eps=1e-6, backend=backend)
    ref = df.reference.group_norm(x.double(), G, eps=1e-6)
    rest = x != -1e4
    assert rest.sum() == x.numel() - shape[0] * G
    assert rel_err(y[rest], ref[rest]) < 1e-6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,mean,std", [(torch.float32, 0.0, 1.0), (torch.float16, 0.0, 1.0),
                                             (torch.bfloat16, 0.0, 1.0), (torch.float32, 1e3, 1e-2)],
                         ids=["float32", "float16", "bfloat16", "float32-large-mean"])
def test_kernel_channels_last_row_slices(backend, dtype, mean, std, gen, poison):
    """A batch-1 channels_last map big enough that the CPU kernel splits its rows over threads
    (per-slice partial sums reduced per group)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        gn_kernel_vs_reference(backend, dtype, (1, 64, 40, 30), 8, "channels_last", ("add", "scale", "shift"), True,
                               gen, mean=mean, std=std)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gpu_offsets_past_int32(backend, fmt, gen, past_int32, poison):
    """Over 2^31 bfloat16 elements (4 GiB a tensor) in 2M groups: every output element written, and the
    first and last four samples (these start past what an int32 offset reaches) within the rounding
    rule of the float64 reference."""
    B = batch_past_int32(128 * 16 * 16)
    x = layout(torch.randn(B, 128, 16, 16, generator=past_int32, device="cuda", dtype=torch.bfloat16), fmt)
    w, b = (torch.randn(128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    y = df.group_norm(x, 32, w, b, silu=True, backend=backend)
    assert y.numel() > 2**31 and bool(torch.isfinite(y).all())
    for part in (slice(0, 4), slice(B - 4, B)):
        xp = x[part]
        ref = df.reference.group_norm(xp.double(), 32, w.double(), b.double(), silu=True)
        eager = df.reference.group_norm(xp, 32, w, b, silu=True)
        assert rel_err(y[part], ref) <= flash_rule(rel_err(eager, ref), torch.bfloat16), part


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_no_affine_and_3d(backend, gen, poison):
    gn_kernel_vs_reference(backend, torch.float32, (2, 8, 9), 2, "contiguous", (), True, gen, affine=False)


# The CUDA kernel's paths (csrc/cuda/group_norm.cu): the on-chip path at each block size when the
# grid of one block per group fills the GPU, else the rows path for narrow channels_last groups or
# the split path, for few groups or groups over 16384 values (8192 with scalar accesses); vector
# widths from the group's contiguous run (HW in NCHW, CG in channels_last) and the pointers'
# alignment (offset).  A tensor of H = W = 1 is contiguous in both layouts and runs as NCHW.
CUDA_GN_CASES = {
    "onchip64-cg1": ((64, 64, 4, 4), 64),      # 4096 groups of 16 values, 64 threads
    "onchip256": ((32, 128, 32, 32), 32),      # 1024 groups of 4096, 256 threads; CG = 4
    "onchip1024": ((4, 128, 64, 64), 32),      # 128 groups of 16384, 1024 threads (scalar: split or rows)
    "onchip-odd": ((96, 40, 7, 7), 8),         # CG = 5, HW = 49: scalar accesses
    "onchip512-odd": ((12, 64, 27, 27), 8),    # 96 groups of 5832 scalar values, 512 threads
    "split-batch1": ((1, 64, 16, 16), 4),      # 4 groups
    "split-large-group": ((2, 64, 40, 32), 4),  # 20480 values a group
    "split-odd": ((3, 40, 7, 7), 8),
    "split-wide-c": ((1, 512, 4, 4), 256),     # channels_last CG = 2, scalar: 512 lanes do not fit a rows block
    "hw1-b1": ((1, 12, 1, 1), 4),
    "hw1-cg8": ((5, 64, 1, 1), 8),
    "cg24": ((2, 48, 9, 9), 2),                # channels_last: 3 vectors a position
    # channels_last groups narrower than a 32-byte sector a position take the rows path (NCHW: split)
    "rows-cg4-b1": ((1, 128, 16, 16), 32),     # 32 lanes a row, 8 rows a step
    "rows-many-tiles": ((1, 128, 64, 64), 32),
    "rows-cg1": ((2, 64, 8, 8), 64),           # 128 groups of 64: too little work for on-chip
    "rows-cg3-odd": ((1, 48, 5, 7), 16),       # 48 scalar lanes, 5 rows a step, 35 rows
    "rows-hw2": ((1, 64, 1, 2), 16),
    "rows-cg8": ((2, 64, 3, 3), 8),            # 16-bit: 8-value accesses (float32 CG = 8 fills a sector: split)
}

# The path each case takes on a GPU of 65 to 192 SMs (A100, H100, H200), as "path threads/vector
# width" of its stats kernel: float32, float32 one element off, bfloat16, bfloat16 four elements off
# (8-byte aligned: 4-value accesses), in NCHW, then the same in channels_last.
CUDA_GN_PATHS = {
    "onchip64-cg1": "onchip64/4 onchip64/1 onchip64/8 onchip64/4  onchip64/1 onchip64/1 onchip64/1 onchip64/1",
    "onchip256": "onchip256/4 onchip256/1 onchip256/8 onchip256/4  onchip256/4 onchip256/1 onchip256/4 onchip256/4",
    "onchip1024": "onchip1024/4 split/1 onchip1024/8 onchip1024/4  onchip1024/4 rows/1 onchip1024/4 onchip1024/4",
    "onchip-odd": "onchip64/1 onchip64/1 onchip64/1 onchip64/1  onchip64/1 onchip64/1 onchip64/1 onchip64/1",
    "onchip512-odd": "onchip512/1 onchip512/1 onchip512/1 onchip512/1  onchip512/4 onchip512/1 onchip512/8 onchip512/4",
    "split-batch1": "split/4 split/1 split/8 split/4  split/4 split/1 split/8 split/4",
    "split-large-group": "split/4 split/1 split/8 split/4  split/4 split/1 split/8 split/4",
    "split-odd": "split/1 split/1 split/1 split/1  rows/1 rows/1 rows/1 rows/1",
    "split-wide-c": "split/4 split/1 split/8 split/4  split/1 split/1 split/1 split/1",
    "hw1-b1": "split/1 split/1 split/1 split/1  split/1 split/1 split/1 split/1",
    "hw1-cg8": "split/1 split/1 split/1 split/1  split/1 split/1 split/1 split/1",
    "cg24": "split/1 split/1 split/1 split/1  split/4 split/1 split/8 split/4",
    "rows-cg4-b1": "split/4 split/1 split/8 split/4  rows/4 rows/1 rows/4 rows/4",
    "rows-many-tiles": "split/4 split/1 split/8 split/4  rows/4 rows/1 rows/4 rows/4",
    "rows-cg1": "split/4 split/1 split/8 split/4  rows/1 rows/1 rows/1 rows/1",
    "rows-cg3-odd": "split/1 split/1 split/1 split/1  rows/1 rows/1 rows/1 rows/1",
    "rows-hw2": "split/1 split/1 split/1 split/1  rows/4 rows/1 rows/4 rows/4",
    "rows-cg8": "split/1 split/1 split/1 split/1  split/4 split/1 rows/8 rows/4",
}
# Each path's kernels, in launch order.
CUDA_GN_KERNELS = {"onchip": ["gn_onchip"], "rows": ["gn_rows_stats", "gn_rows_finalize", "gn_rows_norm"],
                   "split": ["gn_stats", "gn_norm"]}


def cuda_gn_path(x, G, trace):
    """The path x's GroupNorm takes, as in CUDA_GN_PATHS, from the kernels the profiler saw it launch."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        df.group_norm(x, G, silu=True, backend="cuda")
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    with open(trace) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel" and "::gn_" in e["name"]]
    events.sort(key=lambda e: e["ts"])
    launched = [re.search(r"::(gn_\w+)<([^<>]*)>", e["name"]) for e in events]
    names = [m.group(1) for m in launched]
    path = next((k for k, v in CUDA_GN_KERNELS.items() if v == names), None)
    assert path is not None, f"an unknown sequence of GroupNorm kernels: {[e['name'] for e in events]}"
    V = launched[0].group(2).split(",")[-1].strip()
    return f"onchip{events[0]['args']['block'][0]}/{V}" if path == "onchip" else f"{path}/{V}"


@pytest.mark.cuda
@needs("cuda")
@pytest.mark.parametrize("case", list(CUDA_GN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [0, 1, 4])
@pytest.mark.parametrize("flags", ["plain", "all"])
def test_cuda_paths(case, dtype, fmt, offset, flags, gen, poison):
    shape, G = CUDA_GN_CASES[case]
    full = flags == "all"
    gn_kernel_vs_reference("cuda", dtype, shape, G, fmt, ("add", "scale", "shift") if full else (), full, gen,
                           affine=full, offset=offset)


@pytest.mark.cuda
@needs("cuda")
@pytest.mark.parametrize("case", list(CUDA_GN_CASES))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cuda_paths_are_the_ones_named(case, fmt, gen, tmp_path):
    """Each case runs the path, block size and vector width CUDA_GN_PATHS gives it, so that the path
    tests cover every kernel at each width."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if not 65 <= sms <= 192:
        pytest.skip(f"CUDA_GN_PATHS holds for 65 to 192 SMs, this GPU has {sms}")
    shape, G = CUDA_GN_CASES[case]
    got = []
    for dtype, offset in ((torch.float32, 0), (torch.float32, 1), (torch.bfloat16, 0), (torch.bfloat16, 4)):
        x = offset_view(layout(torch.randn(shape, generator=gen), fmt).to("cuda", dtype), offset)
        got.append(cuda_gn_path(x, G, tmp_path / "trace.json"))
    assert got == CUDA_GN_PATHS[case].split()[4 * (fmt == "channels_last"):][:4]


@pytest.mark.cuda
@needs("cuda")
@pytest.mark.parametrize("case", ["onchip256", "split-batch1", "rows-cg4-b1"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cuda_paths_large_mean_small_spread(case, fmt, gen, poison):
    shape, G = CUDA_GN_CASES[case]
    gn_kernel_vs_reference("cuda", torch.float32, shape, G, fmt, ("add",), False, gen, mean=1e3, std=1e-2)


@pytest.mark.cuda
@needs("cuda")
@pytest.mark.parametrize("case", list(CUDA_GN_CASES))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("place", ["first", "middle"])
def test_cuda_paths_outlier(case, fmt, place, gen, poison):
    shape, G = CUDA_GN_CASES[case]
    gn_kernel_vs_reference("cuda", torch.float32, shape, G, fmt, ("add",), True, gen, outlier=(place, 1e4))


@pytest.mark.cuda
@needs("cuda")
@pytest.mark.parametrize("case", list(CUDA_GN_CASES))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_paths_repeat_bit_for_bit(case, fmt, dtype, gen):
    """No path's statistics take atomics: the same input gives the same bits on every run."""
    shape, G = CUDA_GN_CASES[case]
    x = layout(torch.randn(shape, generator=gen), fmt).to("cuda", dtype)
    add = torch.randn(shape[0], shape[1], generator=gen).to("cuda", dtype)
    first = df.group_norm(x, G, add=add, silu=True, backend="cuda")
    for _ in range(4):
        assert torch.equal(df.group_norm(x, G, add=add, silu=True, backend="cuda"), first)


@pytest.mark.cuda
@needs("cuda")
@pytest.mark.parametrize("shape, fmt", [((128, 8192, 1, 1), "contiguous"), ((1, 8192, 1, 2), "contiguous"),
                                        ((1, 4096, 2, 2), "contiguous"), ((64, 16384, 1, 1), "channels_last")],
                         ids=["onchip-96KiB", "split-64KiB", "split-32KiB", "onchip-or-split"])
def test_cuda_wide_groups(shape, fmt, gen, poison):
    """Per-channel tables in opted-in shared memory: on chip 12 bytes a channel (96 KiB at 8192
    channels a group), the split path 8 (32 KiB at 4096: under the default 48).  At 16384 channels
    the on-chip table (192 KiB) fits an sm_90 block and not an sm_80 one, which takes the split path
    (128 KiB)."""
    gn_kernel_vs_reference("cuda", torch.float32, shape, 1, fmt, ("add", "scale"), True, gen)


@pytest.mark.triton
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("mean", [0.0, 1e3])
@pytest.mark.parametrize("shape", [(2, 16, 9, 9), (1, 32, 40, 30)], ids=["one-tile", "tiles-then-a-part"])
def test_triton_onchip_and_split_paths(split, mean, shape, gen, poison):
    """(1, 32, 40, 30): 1200 positions in tiles of 256, so a slice's last tile runs past the group
    after whole ones (split 1: the split path, the group being too large for one program)."""
    if df.available_backends()["triton"] is not True:
        pytest.skip(df.available_backends()["triton"])
    gn_kernel_vs_reference("triton", torch.float32, shape, 4, "contiguous", ("add", "scale"), True, gen,
                           split=split, mean=mean, std=1e-2 if mean else 1.0)


def test_kernel_opcheck_and_compile(gen):
    if df.available_backends()["cpu"] is not True:
        pytest.skip("extension not built")
    x = torch.randn(2, 8, 4, 4, generator=gen)
    w, b, a = torch.randn(8), torch.randn(8), torch.randn(2, 8)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm.default, (x, 4, w, b, 1e-5, a, None, None, True, False))
    xb = x.bfloat16()
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm.default,
                          (xb, 4, w.bfloat16(), b, 1e-5, a.bfloat16(), None, None, True, False))
    with pytest.raises(RuntimeError, match=r"weight: expected a contiguous float32 or x's dtype tensor of 8 elements on cpu, got Half"):
        torch.ops.ddpm_fast.group_norm(xb, 4, w.half(), b, 1e-5, None, None, None, False, False)

    def f(x):
        return df.group_norm(x, 4, w, b, add=a, silu=True, backend="cpu")

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


PARAM_DTYPES = {  # (weight and bias, add/scale/shift) dtypes for 16-bit x: what each kind of model hands the norm
    "float32": (torch.float32, torch.float32),  # autocast: float32 weights, float32 embeddings
    "autocast": (torch.float32, None),  # float32 weights, the embedding from a projection in x's dtype
    "like-x": (None, None),  # a bf16/fp16 model
    "other-16-bit": ("other", "other"),  # fp16 parameters with bf16 x, and the reverse: cast to float32 first
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", list(PARAM_DTYPES))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_kernel_parameter_dtypes(backend, dtype, params, fmt, gen, poison):
    """Parameters in float32, in x's dtype or in another: each read as the float32 of its value."""
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    pick = {None: dtype, "other": other}
    wd, ed = (pick.get(d, d) for d in PARAM_DTYPES[params])
    dev = backend_device(backend)
    shape, G = (3, 32, 5, 6), 8
    x = layout(torch.randn(shape, generator=gen).to(dev, dtype), fmt)
    w, b = (torch.randn(shape[1], generator=gen).to(dev, wd) for _ in range(2))
    extra = {k: (torch.randn(shape[:2], generator=gen) * 0.5).to(dev, ed) for k in ("add", "scale", "shift")}
    y = df.group_norm(x, G, w, b, 1e-6, silu=True, backend=backend, **extra)
    ref = df.reference.group_norm(x.double(), G, w.double(), b.double(), 1e-6, silu=True,
                                  **{k: v.double() for k, v in extra.items()})
    eager = df.reference.group_norm(x, G, w, b, 1e-6, silu=True, **extra)
    assert y.dtype == dtype
    assert rel_err(y, ref) <= flash_rule(rel_err(eager, ref), dtype, store_slack(backend, dtype))


class CastLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts.append((tuple(args[0].shape), args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_parameters_in_x_dtype_are_not_cast(backend, gen):
    """The kernels read parameters in float32 or x's dtype as they are; only another dtype is cast."""
    dev = backend_device(backend)
    x = torch.randn(2, 16, 4, 4, generator=gen).to(dev, torch.bfloat16)
    w, b, add = torch.randn(16, device=dev), torch.randn(16, device=dev), torch.randn(2, 16, device=dev)
    w16, b16, add16, w_half = w.bfloat16(), b.bfloat16(), add.bfloat16(), w.half()
    with CastLog() as log:
        df.group_norm(x, 4, w, b, add=add16, silu=True, backend=backend)
        df.group_norm(x, 4, w16, b16, add=add, backend=backend)
    assert log.casts == []
    with CastLog() as log:
        df.group_norm(x, 4, w_half, b, backend=backend)
    assert log.casts == [((16,), torch.float16)]
