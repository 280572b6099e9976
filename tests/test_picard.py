"""picard_step (one Picard iteration over windows of reverse steps): the reference's own contract,
and every kernel against the float64 reference."""

import pytest
import torch

import ddpm_fast as df
from conftest import KERNEL_BACKENDS, backend_device, rel_err, store_slack

VARIANCES = ["fixed_small", "fixed_large", "learned_range"]


def window_inputs(shape, gen, variance="fixed_small", dev="cpu", dtype=torch.float32):
    """x [A, P + 1, C, ...], model outputs [A, P, C', ...], t [A, P] with the step at 0 and positions
    past the end, image indices [A] that are not a consecutive run."""
    A, P1, C = shape[:3]
    P = P1 - 1
    x = torch.randn(shape, generator=gen).to(dev, dtype)
    oshape = (A, P, 2 * C if variance == "learned_range" else C, *shape[3:])
    out = (torch.randn(oshape, generator=gen) * 1.5).to(dev, dtype)
    start = torch.randint(0, 1000, (A,), generator=gen)
    start[0] = min(P - 2, 999) if P >= 2 else 0  # reaches t = 0 and then runs past the end
    t = (start[:, None] - torch.arange(P)).to(dev)
    sample = (torch.randperm(4 * A + 3, generator=gen)[:A] + 5).to(dev)
    return x, out, t, sample


def test_reference_window_one_is_p_step(gen):
    s = df.NoiseSchedule.linear(1000)
    for variance in VARIANCES:
        x, out, t, sample = window_inputs((3, 2, 2, 5, 3), gen, variance, dtype=torch.float64)
        y, err = df.reference.picard_step(x, out, t, s, sample, seed=11, variance=variance)
        for a in range(3):
            step = df.reference.p_step(x[a, :1], out[a, :1], t[a, :1].clamp(min=0), s, seed=11,
                                       sample_offset=int(sample[a]), variance=variance)
            want = step if t[a, 0] >= 0 else x[a, :1]
            assert rel_err(y[a, 1:], want) < 1e-7  # the seeded paths draw fp32 normals
            assert torch.equal(y[a, 0], x[a, 0])
            assert err[a, 0] == pytest.approx(float((y[a, 1] - x[a, 1]).square().sum()), rel=1e-12)


def test_reference_is_the_picard_sum(gen):
    """x'_{j+1} = x_0 + sum_{m<=j} (S_m - x_m): the scan's closed form."""
    s = df.NoiseSchedule.linear(1000)
    x, out, t, sample = window_inputs((2, 6, 3, 4, 4), gen, dtype=torch.float64)
    y, _ = df.reference.picard_step(x, out, t, s, sample, seed=3)
    steps = torch.stack([torch.stack([
        df.reference.p_step(x[a, j:j + 1], out[a, j:j + 1], t[a, j:j + 1].clamp(min=0), s, seed=3,
                            sample_offset=int(sample[a]))[0] if t[a, j] >= 0 else x[a, j] for j in range(5)])
        for a in range(2)])
    closed = x[:, :1] + (steps - x[:, :5]).cumsum(1)
    assert rel_err(y[:, 1:], closed) < 1e-12


def test_converged_window_reproduces_the_sequential_recursion(gen):
    """When the guesses are the sequential trajectory, one iteration returns it unchanged, err = 0."""
    s = df.NoiseSchedule.linear(1000)
    A, P = 2, 5
    x0 = torch.randn(A, 3, 4, 4, generator=gen)
    t = (torch.tensor([[700], [P - 2]]) - torch.arange(P)).clone()
    sample = torch.tensor([4, 9])
    out = torch.randn(A, P, 3, 4, 4, generator=gen)
    states = [x0]
    for j in range(P):
        # p_step numbers images from sample_offset: one call per image gives each its own index
        step = torch.stack([df.p_step(states[-1][a:a + 1], out[a:a + 1, j], t[a:a + 1, j].clamp(min=0), s, seed=21,
                                      sample_offset=int(sample[a]), backend="reference")[0] for a in range(A)])
        states.append(torch.where((t[:, j] >= 0).view(A, 1, 1, 1), step, states[-1]))
    traj = torch.stack(states, dim=1)
    y, err = df.picard_step(traj, out, t, s, sample, 21, backend="reference")
    assert torch.equal(y, traj)
    assert torch.equal(err, torch.zeros(A, P))


def kernel_vs_reference(backend, dtype, shape, variance, gen, prediction="epsilon", form="posterior", clip=True):
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    x, out, t, sample = window_inputs(shape, gen, variance, dev, dtype)
    seed = int(torch.randint(0, 2**62, (), generator=gen)) * 4 + 1
    kw = dict(prediction=prediction, variance=variance, clip_sample=clip, clip_range=1.3, form=form)
    x_in, out_in = x.clone(), out.clone()
    y, err = df.picard_step(x, out, t, s, sample, seed, backend=backend, **kw)
    assert torch.equal(x, x_in) and torch.equal(out, out_in), "inputs modified"
    assert y.dtype == dtype and y.shape == x.shape and err.dtype == torch.float32 and err.shape == t.shape
    ref, ref_err = df.reference.picard_step(x.double().cpu(), out.double().cpu(), t.cpu(), s, sample.cpu(), seed,
                                            **kw)
    assert torch.equal(y[:, 0].cpu(), x[:, 0].cpu())
    # The scan adds P steps' rounding; half-precision outputs are one rounding of the float32 value.
    P = shape[1] - 1
    bound = 1e-5 * P if dtype == torch.float32 else store_slack(backend, dtype) * torch.finfo(dtype).eps
    assert rel_err(y.cpu(), ref) <= bound
    # err compares the float32 scan value with the stored states: no half-precision rounding in it.
    assert rel_err(err.cpu(), ref_err) < 1e-5 * P
    assert torch.isfinite(err).all()
    return y, err


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("shape", [(3, 5, 3, 5, 7), (1, 2, 1, 3, 3), (2, 9, 4, 1, 1)], ids=["odd", "b1-p1", "hw1"])
def test_kernel_matches_float64(backend, dtype, variance, shape, gen, poison):
    kernel_vs_reference(backend, dtype, shape, variance, gen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("prediction,form,clip", [("v_prediction", "eps", True), ("sample", "posterior", False),
                                                  ("epsilon", "eps", False)])
def test_kernel_options(backend, prediction, form, clip, gen, poison):
    kernel_vs_reference(backend, torch.float32, (2, 4, 3, 8, 8), "fixed_small", gen, prediction, form, clip)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_several_blocks_per_image(backend, gen, poison):
    """Images longer than one program's / task's tile: the error partials add up across them."""
    kernel_vs_reference(backend, torch.float32, (2, 3, 3, 40, 41), "fixed_small", gen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance", VARIANCES)
def test_kernel_window_one_is_its_p_step(backend, dtype, variance, gen):
    """A window of one is the backend's own fused p_step, bit for bit."""
    dev = backend_device(backend)
    s = df.NoiseSchedule.linear(1000)
    x, out, t, sample = window_inputs((4, 2, 3, 6, 5), gen, variance, dev, dtype)
    t = torch.tensor([[0], [1], [500], [999]], device=dev)
    sample = torch.arange(7, 11, device=dev)
    y, _ = df.picard_step(x, out, t, s, sample, 123, variance=variance, backend=backend)
    want = df.p_step(x[:, 0], out[:, 0], t[:, 0], s, seed=123, sample_offset=7, variance=variance, backend=backend)
    assert torch.equal(y[:, 1], want)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_images_own_their_noise(backend, gen):
    """Image a's result depends on (seed, sample[a]) only, not on its row or the other images."""
    dev = backend_device(backend) if backend != "reference" else "cpu"
    s = df.NoiseSchedule.linear(1000)
    x, out, t, sample = window_inputs((3, 4, 2, 5, 5), gen, dev=dev)
    y, err = df.picard_step(x, out, t, s, sample, 9, backend=backend)
    y1, err1 = df.picard_step(x[2:], out[2:], t[2:], s, sample[2:], 9, backend=backend)
    assert torch.equal(y[2:], y1) and torch.equal(err[2:], err1)


BAD = [
    (dict(x=torch.randn(2, 1, 3, 4, 4)), ValueError, "P >= 1"),
    (dict(model_output=torch.randn(2, 3, 3, 4, 4)), ValueError, "model_output"),
    (dict(model_output=torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)), TypeError, "model_output"),
    (dict(t=torch.zeros(2, 3, dtype=torch.long)), ValueError, "t: "),
    (dict(t=torch.full((2, 2), 1000)), ValueError, "t: "),
    (dict(sample=torch.tensor([0, -1])), ValueError, "sample"),
    (dict(sample=torch.tensor([0.0, 1.0])), ValueError, "sample"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(variance="learned_range"), ValueError, "model_output"),
    (dict(form="ddim"), ValueError, "form"),
    (dict(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=[f"{i}-{b[2][:12]}" for i, b in enumerate(BAD)])
def test_bad_input(kw, exc, match):
    args = dict(x=torch.randn(2, 3, 3, 4, 4), model_output=torch.randn(2, 2, 3, 4, 4),
                t=torch.tensor([[5, 4], [1, 0]]), schedule=df.NoiseSchedule.linear(1000), sample=torch.tensor([0, 1]),
                seed=1)
    args.update(kw)
    with pytest.raises(exc, match=match):
        df.picard_step(**args)


@pytest.mark.parametrize("backend", [p for p in KERNEL_BACKENDS if p.values[0] != "triton"])
def test_op_schema_guards(backend, gen):
    """A direct torch.ops call: the op raises, naming the argument, where the kernel would divide by
    C = 0 or read table[-1]."""
    dev = backend_device(backend)
    x, out, t, sample = window_inputs((2, 4, 3, 5, 5), gen, dev=dev)
    table = df.NoiseSchedule.linear(1000).to(dev).table
    with pytest.raises(RuntimeError, match="table: expected"):
        torch.ops.ddpm_fast.picard_step(x, out, t, table[:, :0], sample, 5, 0, 0, 0, True, 1.0)
    with pytest.raises(RuntimeError, match="model_output: expected"):
        torch.ops.ddpm_fast.picard_step(x, out[..., :4], t, table, sample, 5, 0, 0, 0, True, 1.0)
    y, err = torch.ops.ddpm_fast.picard_step(x[:, :, :0], out[:, :, :0], t, table, sample, 5, 0, 0, 0, True, 1.0)
    assert y.shape == x[:, :, :0].shape and err.shape == t.shape


@pytest.mark.parametrize("backend", [p for p in KERNEL_BACKENDS if p.values[0] != "triton"])
def test_opcheck(backend, gen):
    """The extension's schema, fake kernel and implementation agree (the Triton launcher is plain Python)."""
    dev = backend_device(backend)
    x, out, t, sample = window_inputs((2, 4, 3, 5, 5), gen, dev=dev)
    table = df.NoiseSchedule.linear(1000).to(dev).table
    torch.library.opcheck(torch.ops.ddpm_fast.picard_step, (x, out, t, table, sample, 5, 0, 0, 0, True, 1.0))
