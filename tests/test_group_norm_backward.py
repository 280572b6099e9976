"""The GroupNorm family's backward: gradients in x, weight, bias, add, scale and shift from every
kernel backend against autograd through the float64 reference."""

import pytest
import torch
import torch.nn as nn

import ddpm_fast as df
from conftest import KERNEL_BACKENDS, backend_device, flash_rule, gn_with_outlier, layout, needs, rel_err, store_slack

OPTIONS = [(), ("add",), ("scale", "shift"), ("add", "scale", "shift")]
LEAVES = ("x", "weight", "bias", "add", "scale", "shift")


def make_inputs(shape, G, options, affine, gen, dtype=torch.float64, dev="cpu", mean=0.0, std=1.0, outlier=None):
    B, C = shape[:2]
    x = torch.randn(shape, generator=gen) * std + mean
    if outlier is not None:
        x = gn_with_outlier(x, G, *outlier)
    t = {"x": x, "weight": torch.randn(C, generator=gen), "bias": torch.randn(C, generator=gen)} if affine else {"x": x}
    t.update({k: torch.randn(B, C, generator=gen) * 0.5 for k in options})
    return {k: v.to(dev, dtype) for k, v in t.items()}


def offset_view(x, offset):
    """x's values in x's layout, `offset` elements into a fresh buffer (see test_group_norm.py)."""
    if not offset:
        return x
    v = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device).as_strided(x.shape, x.stride(), offset)
    return v.copy_(x)


def grads(inputs, G, dy, silu, backend, fmt="contiguous", offset=0):
    """(y, {name: gradient}) of sum(y * dy) through df.group_norm on leaves made from inputs, x and dy
    `offset` elements into their buffers."""
    leaves = {k: (offset_view(layout(v, fmt), offset) if k == "x" else v).detach().requires_grad_()
              for k, v in inputs.items()}
    dy = offset_view(layout(dy, fmt), offset) if offset else dy
    kw = {k: v for k, v in leaves.items() if k != "x"}
    y = df.group_norm(leaves["x"], G, eps=1e-6, silu=silu, backend=backend, **kw)
    got = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, got))


def check_backward(backend, dtype, shape, G, fmt, options, silu, gen, affine=True, mean=0.0, std=1.0, offset=0,
                   outlier=None):
    dev = backend_device(backend)
    inputs = make_inputs(shape, G, options, affine, gen, dtype, dev, mean, std, outlier)
    dy = torch.randn(shape, generator=gen).to(dev, dtype)
    before = {k: v.clone() for k, v in inputs.items()}
    _, got = grads(inputs, G, dy, silu, backend, fmt, offset)
    assert all(torch.equal(inputs[k], before[k]) for k in inputs)
    # The float64 truth from the same (rounded) inputs, and eager PyTorch's error in this dtype.
    _, ref = grads({k: v.double() for k, v in inputs.items()}, G, dy.double(), silu, "reference")
    _, eager = grads(inputs, G, dy, silu, "reference")
    # With one channel a group (G = C) an add shifts the whole group: its true gradient is 0, and
    # what comes out is the cancellation of sum dx over the channel, measured against sum |dx|.
    zero_add = G == shape[1]
    for k, g in got.items():
        assert g.dtype == dtype and g.shape == inputs[k].shape, k
        if k == "x" and fmt == "channels_last":
            assert g.is_contiguous(memory_format=torch.channels_last)
        err_of = rel_err
        if k == "add" and zero_add:
            scale = ref["x"].abs().flatten(2).sum(-1).norm().item()
            err_of = lambda a, r: (a.double() - r).norm().item() / scale  # noqa: E731
        err = err_of(g, ref[k])
        bound = flash_rule(err_of(eager[k], ref[k]), dtype, store_slack(backend, dtype))
        assert err <= bound, (k, err, bound)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("silu", [False, True])
def test_gradcheck_reference(options, silu, gen):
    inputs = make_inputs((2, 6, 3, 2), 3, options, True, gen)
    names = list(inputs)

    def f(*tensors):
        kw = dict(zip(names[1:], tensors[1:]))
        return df.group_norm(tensors[0], 3, eps=1e-5, silu=silu, backend="reference", **kw)

    assert torch.autograd.gradcheck(f, tuple(v.requires_grad_() for v in inputs.values()))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "plain")
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_kernel_backward_options(backend, options, silu, affine, fmt, gen, poison):
    check_backward(backend, torch.float32, (2, 16, 5, 7), 4, fmt, options, silu, gen, affine=affine)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape,G", [((1, 12, 1, 1), 4), ((3, 40, 7, 7), 8), ((2, 16, 5, 3), 16), ((2, 16, 6, 5), 1)],
                         ids=["hw1-b1", "odd", "G=C", "G=1"])
def test_kernel_backward_dtypes_layouts_shapes(backend, dtype, fmt, shape, G, gen, poison):
    check_backward(backend, dtype, shape, G, fmt, ("add", "scale", "shift"), True, gen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_kernel_backward_large_mean_and_3d(backend, fmt, gen, poison):
    check_backward(backend, torch.float32, (2, 32, 8, 8), 8, fmt, ("add",), True, gen, mean=1e3, std=1e-2)
    if fmt == "contiguous":
        check_backward(backend, torch.float32, (2, 8, 9), 2, fmt, ("scale",), True, gen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("place", ["first", "last"])
@pytest.mark.parametrize("shape,G", [((2, 16, 9, 9), 4), ((1, 16, 48, 48), 2)], ids=["small-groups", "large-groups"])
def test_kernel_backward_outlier(backend, fmt, place, shape, G, gen, poison):
    """One value of every group 10^4 standard deviations out, where the pivot may be chosen
    (test_group_norm.py's test_kernel_outlier): the backward centres on the forward's pivot."""
    check_backward(backend, torch.float32, shape, G, fmt, ("add", "scale"), True, gen, outlier=(place, 1e4))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4)], ids=["no-samples", "no-positions"])
def test_kernel_backward_empty(backend, shape, gen, poison):
    """Empty inputs: empty gradients for x and add, zeros for the parameters."""
    dev = backend_device(backend)
    p = make_inputs(shape, 4, ("add", "scale", "shift"), True, gen, torch.float32, dev)
    _, got = grads(p, 4, torch.empty(shape, device=dev), True, backend)
    for k, g in got.items():
        assert g.shape == p[k].shape and torch.equal(g, torch.zeros_like(g)), k


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backward_row_slices(backend, gen, poison):
    """A batch-1 map big enough that the CPU kernel splits its rows over threads and Triton takes
    its split path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        for fmt in ("contiguous", "channels_last"):
            check_backward(backend, torch.float32, (1, 64, 40, 30), 8, fmt, ("add", "scale", "shift"), True, gen)
    finally:
        torch.set_num_threads(threads)


# The CUDA backward's vector widths (from HW in NCHW, CG in channels_last, and the pointers'
# alignment) and channel runs: in channels_last a thread keeps its channels when 256 is a multiple of
# CG / V vectors a position, else they change every step (CG = 24).
CUDA_GNB_CASES = {
    "hw64": ((2, 32, 8, 8), 8),
    "cg4": ((2, 128, 6, 6), 32),
    "cg24": ((2, 48, 9, 9), 2),
    "cg1": ((4, 16, 4, 4), 16),
    "hw1": ((3, 64, 1, 1), 8),
    "odd": ((3, 40, 7, 7), 8),
    "batch1-large-group": ((1, 64, 40, 32), 4),
    "cg4096": ((1, 4096, 2, 2), 1),
}


@pytest.mark.cuda
@needs("cuda")
@pytest.mark.parametrize("case", list(CUDA_GNB_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("offset", [0, 1, 4])
@pytest.mark.parametrize("flags", ["plain", "all"])
def test_cuda_backward_paths(case, dtype, fmt, offset, flags, gen, poison):
    shape, G = CUDA_GNB_CASES[case]
    full = flags == "all"
    check_backward("cuda", dtype, shape, G, fmt, ("add", "scale", "shift") if full else (), full, gen, affine=full,
                   offset=offset)


@pytest.mark.cuda
@needs("cuda")
def test_cuda_backward_channels_a_group_limit(gen):
    x = torch.randn(1, 8192, 1, 2, generator=gen).cuda().requires_grad_()
    y = df.group_norm(x, 1, backend="cuda")
    with pytest.raises(RuntimeError, match="at most 4096 channels a group"):
        y.backward(torch.ones_like(y))


@pytest.mark.triton
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_triton_backward_onchip_and_split_paths(split, fmt, gen, poison):
    if df.available_backends()["triton"] is not True:
        pytest.skip(df.available_backends()["triton"])
    from ddpm_fast.triton.group_norm import group_norm, group_norm_backward

    cl = fmt == "channels_last"
    dev = backend_device("triton")
    p = make_inputs((2, 16, 9, 9), 4, ("add", "scale", "shift"), True, gen, torch.float32, dev)
    x = layout(p["x"], fmt)
    args = (p["weight"], p["bias"], p["add"], p["scale"], p["shift"], True, cl)
    _, mean, rstd = group_norm(x, 4, *args[:2], 1e-6, *args[2:], split=split)
    dy = layout(torch.randn(x.shape, generator=gen).to(dev), fmt)
    dx, sums = group_norm_backward(dy, x, mean, rstd, 4, *args, split=split)
    # The reference's gradient in x, and the sums it implies: S1 = dshift, row 3 = dadd.
    _, ref = grads({k: v.double() for k, v in p.items()}, 4, dy.double(), True, "reference")
    assert rel_err(dx, ref["x"]) < 1e-5 and sums.shape == (4, 2, 16)
    assert rel_err(sums[0], ref["shift"]) < 1e-5
    assert rel_err(sums[3], ref["add"]) < 1e-5


def test_param_grads_need_only_what_is_asked(gen):
    """Gradients flow to the leaves that need them and to no other: x alone, or parameters alone."""
    if df.available_backends()["cpu"] is not True:
        pytest.skip(df.available_backends()["cpu"])
    p = make_inputs((2, 8, 4, 4), 2, ("add", "scale", "shift"), True, gen, torch.float32)
    p["weight"].requires_grad_()
    y = df.group_norm(p["x"], 2, p["weight"], p["bias"], add=p["add"], scale=p["scale"], shift=p["shift"], silu=True,
                      backend="cpu")
    y.square().sum().backward()
    ref = p["weight"].detach().double().requires_grad_()
    d = {k: v.double() for k, v in p.items() if k != "weight"}
    df.group_norm(d["x"], 2, ref, d["bias"], add=d["add"], scale=d["scale"], shift=d["shift"],
                  silu=True).square().sum().backward()
    assert rel_err(p["weight"].grad, ref.grad) < 1e-5
    assert all(p[k].grad is None for k in p if k != "weight")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_eager_graph_takes_the_plain_function_with_the_registered_gradients(backend, fmt, gen):
    """An eager call that records a graph runs ops._gn_function, a plain autograd.Function (host time:
    torch.library's wrapper costs more than the op), and gets the gradients, bit for bit, of the
    registered autograd that torch.compile traces.  Under torch.func.grad, which that autograd does
    not take, 'auto' runs the reference and a named kernel backend says so; vmap takes the op."""
    from ddpm_fast import ops

    dev = backend_device(backend)
    p = make_inputs((3, 12, 5, 5), 4, ("add", "scale", "shift"), True, gen, torch.float32, dev)
    p["x"] = layout(p["x"], fmt)
    leaves = [v.requires_grad_() for v in p.values()]
    dy = torch.randn(p["x"].shape, generator=gen).to(dev)
    kw = {k: v for k, v in p.items() if k != "x"}
    y = df.group_norm(p["x"], 4, eps=1e-6, silu=True, backend=backend, **kw)
    assert type(y.grad_fn).__name__ == "GroupNormFunctionBackward"
    got = torch.autograd.grad(y, leaves, dy)
    op = ops._triton_group_norm_op() if backend == "triton" else torch.ops.ddpm_fast.group_norm
    y_op = op(p["x"], 4, p["weight"], p["bias"], 1e-6, p["add"], p["scale"], p["shift"], True,
              fmt == "channels_last")[0]
    assert "GroupNormFunction" not in type(y_op.grad_fn).__name__
    want = torch.autograd.grad(y_op, leaves, dy)
    assert torch.equal(y, y_op)
    for name, g, w in zip(p, got, want):
        assert torch.equal(g, w), name
    def loss(x, b):
        return (df.group_norm(x, 4, eps=1e-6, silu=True, backend=b, **kw) * dy).sum()

    dx = torch.func.grad(loss)(p["x"].detach(), "auto")
    assert rel_err(dx, got[0]) < 1e-5
    with pytest.raises(df.BackendUnavailableError, match="torch.func"):
        torch.func.grad(loss)(p["x"].detach(), backend)
    if fmt == "contiguous":  # vmap alone, with autograd outside it: the kernel op, as in a Python loop
        xs = torch.stack([p["x"].detach()] * 2)  # (torch's vmap cannot query a channels_last layout)
        y2 = torch.func.vmap(lambda x: df.group_norm(x, 4, eps=1e-6, silu=True, backend=backend, **kw))(xs)
        dw, = torch.autograd.grad(y2, p["weight"], torch.stack([dy] * 2))
        assert torch.equal(y2[1], y) and rel_err(dw, 2 * got[1]) < 1e-5


def kernel_available(name):
    if df.available_backends()[name] is not True:
        pytest.skip(f"{name}: {df.available_backends()[name]}")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_opcheck_cpu_ops(fmt, gen):
    kernel_available("cpu")
    x = layout(torch.randn(2, 8, 4, 4, generator=gen), fmt).requires_grad_()
    w, b = torch.randn(8, generator=gen, requires_grad=True), torch.randn(8, generator=gen, requires_grad=True)
    a, s, h = (torch.randn(2, 8, generator=gen, requires_grad=True) for _ in range(3))
    cl = fmt == "channels_last"
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm.default, (x, 4, w, b, 1e-5, a, s, h, True, cl))
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm.default, (x, 2, None, None, 1e-5, None, None, None, False, cl))
    _, mean, rstd = torch.ops.ddpm_fast.group_norm(x.detach(), 4, w, b, 1e-5, a, s, h, True, cl)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_backward.default,
                          (dy, x.detach(), mean, rstd, 4, w.detach(), b.detach(), a.detach(), s.detach(), h.detach(),
                           True, cl))


@pytest.mark.triton
def test_opcheck_triton_ops(gen):
    kernel_available("triton")
    from ddpm_fast import ops

    op = ops._triton_group_norm_op()
    from ddpm_fast.triton.group_norm import group_norm_backward_op

    dev = backend_device("triton")
    x = torch.randn(2, 8, 3, 3, generator=gen).to(dev).requires_grad_()
    w, b = (torch.randn(8, generator=gen).to(dev).requires_grad_() for _ in range(2))
    a = torch.randn(2, 8, generator=gen).to(dev).requires_grad_()
    torch.library.opcheck(op, (x, 4, w, b, 1e-5, a, None, None, True, False))
    _, mean, rstd = op(x.detach(), 4, w, b, 1e-5, a, None, None, True, False)
    torch.library.opcheck(group_norm_backward_op, (torch.randn_like(x), x.detach(), mean, rstd, 4, w.detach(),
                                                   b.detach(), a.detach(), None, None, True, False))


class TinyBlock(nn.Module):
    """conv -> GroupNorm+SiLU with the time embedding added -> conv: norm2 of a ResBlock."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        self.norm = df.FusedGroupNormSiLU(4, 8, eps=1e-6)
        self.temb = nn.Linear(4, 8)

    def forward(self, x, emb):
        return self.conv2(self.norm(self.conv1(x), add=self.temb(emb)))


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward(gen):
    kernel_available("cpu")
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = TinyBlock()
    x, emb = torch.randn(2, 3, 6, 6, generator=gen), torch.randn(2, 4, generator=gen)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, emb)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model.double()(x.double(), emb.double())  # float64: the reference path
    ref.square().sum().backward()
    assert rel_err(out, ref) < 1e-5
    for n, p in model.named_parameters():
        assert rel_err(got[n], p.grad) < 1e-5, n
