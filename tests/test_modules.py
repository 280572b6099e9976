import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm_fast as df
from conftest import rel_err

diffusers = pytest.importorskip("diffusers")

SMALL = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
             attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6)
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
               norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


@pytest.mark.parametrize("cls,act", [(df.FusedGroupNorm, lambda y: y), (df.FusedGroupNormSiLU, F.silu)])
def test_fused_modules_are_drop_in(cls, act, gen):
    ref = nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_(generator=gen)
        ref.bias.normal_(generator=gen)
    fused = cls(8, 32, eps=1e-6)
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 32, 5, 5, generator=gen)
    with torch.no_grad():
        assert rel_err(fused(x), act(ref.double()(x.double()))) < 1e-5
    # with grad it runs the kernels and their backward
    y = fused(x)
    y.sum().backward()
    assert fused.weight.grad is not None


def randomised_unet(cfg, gen, **extra):
    unet = diffusers.UNet2DModel(**cfg, **extra).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5))
    return unet


@pytest.mark.parametrize("extra", [{}, {"resnet_time_scale_shift": "scale_shift"}], ids=["default", "scale_shift"])
def test_accelerate_diffusers_unet(extra, gen):
    unet = randomised_unet(SMALL, gen, **extra)
    plain = copy.deepcopy(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    assert df.accelerate(unet) is unet
    assert isinstance(unet.down_blocks[0].resnets[0].norm1, df.FusedGroupNormSiLU)
    assert isinstance(unet.conv_norm_out, df.FusedGroupNormSiLU)
    after = unet.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].data_ptr() == ptrs[k] for k in before)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ref = plain.double()(x.double(), t).sample
        out = unet(x, t).sample
    assert rel_err(out, ref) < 1e-5


@pytest.mark.slow
def test_accelerate_cifar10_unet(gen):
    unet = randomised_unet(CIFAR10, gen)
    plain = copy.deepcopy(unet)
    df.accelerate(unet)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = plain.double()(x.double(), torch.tensor([10, 900])).sample
        out = unet(x, torch.tensor([10, 900])).sample
    assert rel_err(out, ref) < 1e-5


def backends_used(monkeypatch):
    """The GroupNorm backends ddpm_fast.ops picks from now on, as a list that fills as they run."""
    from ddpm_fast import ops

    used, pick = [], ops.pick_backend

    def spy(op, *args, **kwargs):
        which = pick(op, *args, **kwargs)
        if op == "group_norm":
            used.append(which)
        return which

    monkeypatch.setattr(ops, "pick_backend", spy)
    return used


def train_grads(model, x, t, call):
    """{name: gradient} of a loss on model's output, x's gradient under "input"."""
    x = x.detach().requires_grad_()
    model.train()
    model.zero_grad()
    call(model, x, t).square().mean().backward()
    return {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def grad_errors(got, ref):
    """Relative error of the whole gradient (every parameter and the input as one vector), and per
    tensor with a floor of 1e-3 of the whole's norm per tensor: some true gradients are 0 (softmax
    ignores the key bias) and come out as roundoff."""
    whole = torch.cat([g.double().flatten() for g in ref.values()]).norm()
    diff = torch.cat([(got[k].double() - g.double()).flatten() for k, g in ref.items()]).norm()
    per = {k: ((got[k].double() - g.double()).norm() / max(g.double().norm(), 1e-3 * whole)).item()
           for k, g in ref.items()}
    return (diff / whole).item(), per


def diffusers_call(m, x, t):
    return m(x, t).sample


def ours_call(m, x, t):
    return m(x, t)


def unet_pair(kind, gen):
    """(accelerated model, unpatched copy) of a small diffusers U-Net or our DDPMUNet."""
    if kind == "ours":
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        net = df.models.DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), image_size=16, num_groups=8,
                                 dropout=0.0)
        return df.accelerate(net), copy.deepcopy(net), ours_call
    extra = {"resnet_time_scale_shift": "scale_shift"} if kind == "diffusers-scale_shift" else {}
    unet = randomised_unet(SMALL, gen, **extra)
    plain = copy.deepcopy(unet)
    return df.accelerate(unet), plain, diffusers_call


KINDS = ["diffusers", "diffusers-scale_shift", "ours"]


@pytest.mark.parametrize("kind", KINDS)
def test_accelerated_unet_trains_fp32(kind, gen, monkeypatch):
    """Gradients of the accelerated model in float32 against the unpatched model in float64 (our
    DDPMUNet takes the reference in float64), with the GroupNorm kernels doing the work."""
    model, plain, call = unet_pair(kind, gen)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([5, 801])
    used = backends_used(monkeypatch)
    got = train_grads(model, x, t, call)
    assert used and set(used) == {"cpu" if df.available_backends()["cpu"] is True else "reference"}
    ref = train_grads(plain.double(), x.double(), t, call)
    whole, per = grad_errors(got, ref)
    assert whole <= 1e-5, whole
    assert max(per.values()) <= 1e-5, max(per.items(), key=lambda kv: kv[1])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["diffusers", "ours"])
def test_accelerated_unet_trains_half(kind, dtype, gen, monkeypatch):
    """In bf16/fp16 the accelerated model's gradient is within twice the unpatched model's error in
    the same dtype (the flash-attention rule), both against float64.  Our DDPMUNet's unpatched twin
    is the same model on the reference ops."""
    from ddpm_fast import ops

    model, plain, call = unet_pair(kind, gen)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([5, 801])
    ref = train_grads(copy.deepcopy(plain).double(), x.double(), t, call)
    with monkeypatch.context() as m:
        if kind == "ours":
            m.setattr(ops, "pick_backend", lambda *args, **kwargs: "reference")
        eager = train_grads(copy.deepcopy(plain).to(dtype), x.to(dtype), t, call)
    got = train_grads(model.to(dtype), x.to(dtype), t, call)
    err, _ = grad_errors(got, ref)
    eager_err, _ = grad_errors(eager, ref)
    assert err <= 2 * eager_err, (err, eager_err)


def test_accelerate_our_unet_and_bad_models():
    net = df.models.DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), image_size=16, num_groups=8)
    assert df.accelerate(net) is net
    with pytest.raises(TypeError, match="model"):
        df.accelerate(nn.Linear(3, 3))


def test_qkv_cache_keeps_one_entry_per_dtype(gen):
    """A float32 call leaves the bf16 entry (the one a captured bf16 step reads by address) where it
    is; an in-place update of a weight rebuilds it."""
    q, k, v = (nn.Linear(8, 8) for _ in range(3))
    cache = df.modules.QKVCache()
    w16, b16 = cache.get(q, k, v, torch.bfloat16)
    assert w16.dtype == b16.dtype == torch.bfloat16 and w16.shape == (24, 8) and b16.shape == (24,)
    assert torch.equal(w16, torch.cat([q.weight, k.weight, v.weight]).to(torch.bfloat16))
    w32, _ = cache.get(q, k, v, torch.float32)
    assert w32.dtype == torch.float32 and cache.get(q, k, v, torch.bfloat16)[0] is w16
    with torch.no_grad():
        k.weight.mul_(2)
    fresh, _ = cache.get(q, k, v, torch.bfloat16)
    assert fresh is not w16 and torch.equal(fresh, torch.cat([q.weight, k.weight, v.weight]).to(torch.bfloat16))
    assert q.weight.dtype == torch.float32 and not any(p.grad is not None for p in q.parameters())
