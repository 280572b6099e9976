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
    # with grad it runs the differentiable reference
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


def test_accelerated_unet_trains(gen):
    unet = randomised_unet(SMALL, gen)
    plain = copy.deepcopy(unet)
    df.accelerate(unet)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    for m in (unet, plain):
        m.train()
        m(x, 5).sample.square().mean().backward()
    for (name, a), (_, b) in zip(unet.named_parameters(), plain.named_parameters()):
        # an absolute floor: some true gradients are 0 (softmax ignores the key bias), computed as ~1e-12
        assert (a.grad - b.grad).norm() <= 1e-4 * b.grad.norm() + 1e-9, name


def test_accelerate_our_unet_and_bad_models():
    net = df.models.DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), image_size=16, num_groups=8)
    assert df.accelerate(net) is net
    with pytest.raises(TypeError, match="model"):
        df.accelerate(nn.Linear(3, 3))
