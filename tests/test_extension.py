"""The compiled extension: build information, op registration, torch.compile."""

import pytest
import torch

import ddpm_fast as df
from conftest import needs
from ddpm_fast import _ext

pytestmark = needs("cpu")


def test_build_info():
    info = _ext.BUILD_INFO
    assert set(info) >= {"cuda", "cuda_archs", "cuda_version", "openmp", "torch", "sources"}
    assert info["openmp"] is True
    assert info["torch"] == torch.__version__.split("+")[0]
    assert _ext.stale_reason(info) is None  # built from this checkout's csrc/: the tests test these kernels
    if info["cuda"]:
        # which archs is the build's choice (CI checks its default, sm_80 + sm_90, with check_build.py;
        # build_for_device.sh builds sm_90 alone); the kernels need sm_80 or newer (mma.sync, cp.async)
        archs = info["cuda_archs"].split(",")
        assert archs and all(int(a) >= 800 for a in archs), archs


def test_available_backends_names_reasons():
    status = df.available_backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"] is True and status["cpu"] is True
    for name, s in status.items():
        assert s is True or (isinstance(s, str) and s), name


@pytest.mark.parametrize("op", ["q_sample", "p_step", "group_norm", "attention"])
def test_forward_mode_ad_runs_the_reference(op, gen):
    """Dual tensors do not require grad, so without a check the kernels would take them and drop
    their tangents (a zero jvp): under forward-mode AD auto runs the reference, and a kernel backend
    named raises."""
    import torch.nn.functional as F

    s = df.NoiseSchedule.linear(100)
    calls = {"q_sample": lambda x, b: df.q_sample(x, 5, s, seed=1, backend=b),
             "p_step": lambda x, b: df.p_step(x, x, 5, s, seed=1, backend=b),
             "group_norm": lambda x, b: df.group_norm(x, 3, silu=True, backend=b),
             "attention": lambda x, b: df.attention(x, x, x, backend=b)}
    x, tangent = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(2))
    ours = torch.func.jvp(lambda x: calls[op](x, "auto"), (x,), (tangent,))
    want = torch.func.jvp(lambda x: calls[op](x, "reference"), (x,), (tangent,))
    assert ours[1].abs().max() > 0
    assert torch.allclose(ours[0], want[0]) and torch.allclose(ours[1], want[1])
    if op == "attention":  # and what auto runs outside forward AD on the CPU, torch's SDPA
        assert torch.allclose(ours[0], F.scaled_dot_product_attention(x, x, x), atol=1e-6)  # outputs near 0
    if op != "attention":
        with pytest.raises(df.BackendUnavailableError, match="no forward-mode AD"):
            torch.func.jvp(lambda x: calls[op](x, "cpu"), (x,), (tangent,))


def test_auto_order_on_a_gpu_machine(monkeypatch):
    """With every backend usable, auto takes KERNELS' order for the device: the CUDA extension for
    every op (ops.attention then goes on to Triton for fp32, which it refuses), the CPU kernels on
    CPU tensors, the reference for float64 or (outside ops.DIFFERENTIABLE) autograd."""
    from ddpm_fast import ops

    monkeypatch.setattr(ops, "_STATUS", {b: True for b in ("reference", "cpu", "cuda", "triton")})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for op in ("philox_randn", "q_sample", "p_step", "group_norm", "attention"):
        assert ops.pick_backend(op, "auto", cuda, torch.float16) == "cuda", op
    for op in ("philox_randn", "q_sample", "p_step", "group_norm"):
        assert ops.pick_backend(op, "auto", cpu, torch.float32) == "cpu", op
    assert ops.pick_backend("attention", "cuda", cuda, torch.bfloat16) == "cuda"
    assert ops.pick_backend("attention", "auto", cpu, torch.float32) == "reference"  # then SDPA in ops.attention
    assert ops.pick_backend("group_norm", "auto", cuda, torch.float64) == "reference"
    # Kernels with a backward keep running under autograd; the others fall back to the reference.
    assert ops.pick_backend("group_norm", "auto", cuda, torch.float32, grad=True) == "cuda"
    assert ops.pick_backend("group_norm", "cpu", cpu, torch.float32, grad=True) == "cpu"
    assert ops.pick_backend("p_step", "auto", cuda, torch.float32, grad=True) == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_philox_randn(dtype):
    t = torch.tensor([3, 0, 7])
    torch.library.opcheck(torch.ops.ddpm_fast.philox_randn.default, (t, [2, 5], 123, 1, 4, dtype))


def test_opcheck_philox4x32():
    c = torch.randint(0, 2**32, (5, 4))
    k = torch.randint(0, 2**32, (5, 2))
    torch.library.opcheck(torch.ops.ddpm_fast.philox4x32.default, (c, k))


@pytest.mark.slow
def test_compiles_under_torch_compile():
    def noisy(x, t):
        return x + 0.1 * df.philox_randn(x.shape, 42, t=t, backend="cpu")

    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([1, 2, 3, 4])
    compiled = torch.compile(noisy, fullgraph=True)
    assert torch.equal(compiled(x, t), noisy(x, t))


def test_unavailable_backend_says_why():
    if df.available_backends()["cuda"] is not True:
        with pytest.raises(df.BackendUnavailableError, match="backend='cuda'"):
            df.philox_randn((2, 3), 1, backend="cuda")
    with pytest.raises(df.BackendUnavailableError, match="no cpu kernel yet"):
        df.attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)), backend="cpu")
    with pytest.raises(df.BackendUnavailableError, match="forward-only"):
        df.q_sample(torch.randn(1, 4, 2, 2, requires_grad=True), 2, df.NoiseSchedule.linear(10), seed=0,
                    backend="cpu")
