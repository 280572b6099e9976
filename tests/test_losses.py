"""ddpm_fast.losses.eps_mse: the fused q_sample + MSE equals the unfused loss, gradients included."""

import copy
import math

import pytest
import torch

import ddpm_fast as df
from conftest import KERNEL_BACKENDS, backend_device, rel_err
from ddpm_fast.losses import eps_mse
from ddpm_fast.reference.philox import STREAM_Q_SAMPLE

SCHEDULE = df.NoiseSchedule.linear(1000)


def tiny_unet():
    return df.models.DDPMUNet(in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(4,), dropout=0.0, image_size=8, num_groups=4)


def unfused_loss(model, x0, t, seed, offset):
    """q_sample on the contract's noise materialised by philox_randn, then the MSE, in model's dtype."""
    noise = df.philox_randn(x0.shape, seed, t=t, stream=STREAM_Q_SAMPLE, sample_offset=offset).to(x0.dtype)
    x_t = df.reference.q_sample(x0, t, SCHEDULE, noise=noise)
    return (model(x_t, t) - noise).square().mean()


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("backend", ["auto", "reference"] + KERNEL_BACKENDS)
def test_gradient_equals_unfused_float64(backend, gen, full_fp32):
    dev = backend_device(backend) if backend in ("triton", "cuda") else "cpu"
    net = tiny_unet().train()
    x0 = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (3,), generator=gen)
    seed, offset = int(torch.randint(0, 2**62, (), generator=gen)), int(torch.randint(0, 10**6, (), generator=gen))
    ref_net = copy.deepcopy(net).double()
    net.to(dev)
    loss = eps_mse(net, x0.to(dev), t.to(dev), SCHEDULE, seed, sample_offset=offset, backend=backend)
    loss.backward()
    ref = unfused_loss(ref_net, x0.double(), t, seed, offset)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss.detach(), ref.detach()) < 1e-5
    assert rel_err(grads(net), grads(ref_net)) < 1e-5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_gradient_equals_unfused_same_dtype_and_reductions(gen):
    net = tiny_unet()
    same = copy.deepcopy(net)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (4,), generator=gen)
    eps_mse(net, x0, t, SCHEDULE, 7, sample_offset=40).backward()
    unfused_loss(same, x0, t, 7, 40).backward()
    assert rel_err(grads(net), grads(same)) < 1e-6
    per_sample = eps_mse(net, x0, t, SCHEDULE, 7, sample_offset=40, reduction="none")
    total = eps_mse(net, x0, t, SCHEDULE, 7, sample_offset=40, reduction="sum")
    mean = eps_mse(net, x0, t, SCHEDULE, 7, sample_offset=40)
    assert per_sample.shape == (4,)
    assert torch.allclose(per_sample.mean(), mean, rtol=1e-6)
    assert torch.allclose(total, mean * x0.numel(), rtol=1e-5)


def test_bf16_autocast_loss_is_float32_and_trains(gen):
    net = tiny_unet()
    x0 = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = eps_mse(net, x0, torch.tensor([3, 700]), SCHEDULE, 1)
    loss.backward()
    assert loss.dtype == torch.float32 and all(torch.isfinite(p.grad).all() for p in net.parameters())


class Recorder:
    """A 'model' returning zeros, which keeps the x_t it was given."""

    def __call__(self, x_t, t):
        self.x_t = x_t
        return torch.zeros_like(x_t, requires_grad=True)


def drawn_noise(x0, t, seed, offset):
    rec = Recorder()
    loss = eps_mse(rec, x0, t, SCHEDULE, seed, sample_offset=offset, reduction="none")
    a = SCHEDULE.sqrt_alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    b = SCHEDULE.sqrt_one_minus_alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    return (rec.x_t - a * x0) / b, loss


def test_noise_statistics_and_the_contract(gen):
    x0 = torch.rand(256, 3, 16, 16, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (256,), generator=gen)
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    eps, loss = drawn_noise(x0, t, seed, 1000)
    n = eps.numel()
    # the loss of a zero model is the mean of eps^2, and eps is N(0, 1): 6-sigma bounds
    assert abs(eps.mean().item()) < 6 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 6 * math.sqrt(2 / n)
    assert abs(loss.mean().item() - 1) < 6 * math.sqrt(2 / n)
    assert abs(((eps > 0).float().mean() - 0.5).item()) < 6 * 0.5 / math.sqrt(n)
    # exactly the contract's stream-1 noise of the samples 1000 .. 1255
    contract = df.philox_randn(x0.shape, seed, t=t, stream=STREAM_Q_SAMPLE, sample_offset=1000)
    assert torch.allclose(eps, contract, atol=2e-4)
    # keyed by the global index: the last two samples drawn as a batch of their own get the same noise
    tail, _ = drawn_noise(x0[-2:], t[-2:], seed, 1254)
    assert torch.allclose(tail, eps[-2:], atol=2e-4)
    # another step's samples (another offset) get independent noise
    other, _ = drawn_noise(x0, t, seed, 1256)
    assert abs(torch.corrcoef(torch.stack([eps.flatten(), other.flatten()]))[0, 1].item()) < 6 / math.sqrt(n)


def test_bad_input():
    net = tiny_unet()
    x0 = torch.zeros(2, 3, 8, 8)
    with pytest.raises(TypeError, match="model"):
        eps_mse("net", x0, 5, SCHEDULE, 0)
    with pytest.raises(ValueError, match="reduction"):
        eps_mse(net, x0, 5, SCHEDULE, 0, reduction="max")
    with pytest.raises(ValueError, match="seed"):
        eps_mse(net, x0, 5, SCHEDULE, None)
    with pytest.raises(ValueError, match="seed"):
        eps_mse(net, x0, 5, SCHEDULE, -1)
    with pytest.raises(ValueError, match="t: expected timesteps"):
        eps_mse(net, x0, torch.tensor([3, 1000]), SCHEDULE, 0)
    with pytest.raises(TypeError, match="x0"):
        eps_mse(net, x0.long(), 5, SCHEDULE, 0)
    with pytest.raises(ValueError, match="model: expected an output of the samples' shape"):
        eps_mse(lambda x, t: x[:, :1], x0, 5, SCHEDULE, 0)
    with pytest.raises(ValueError, match="model: expected an output"):
        eps_mse(lambda x, t: None, x0, 5, SCHEDULE, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_timesteps_with_gpu_samples_match_device_timesteps(gen):
    net = tiny_unet().cuda()
    x0 = (torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1).cuda()
    t = torch.randint(0, 1000, (4,), generator=gen)
    on_host = eps_mse(net, x0, t, SCHEDULE, 5, sample_offset=12, reduction="none")
    on_device = eps_mse(net, x0, t.cuda(), SCHEDULE, 5, sample_offset=12, reduction="none")
    assert torch.equal(on_host, on_device)
    with pytest.raises(ValueError, match="t: expected timesteps"):  # still checked, on the host
        eps_mse(net, x0, torch.tensor([1, 2, 3, 1000]), SCHEDULE, 5)
