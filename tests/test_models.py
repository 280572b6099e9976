import json
import os

import pytest
import torch

import ddpm_fast as df
from conftest import rel_err
from ddpm_fast.models import DDPMUNet

diffusers = pytest.importorskip("diffusers")

CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
SMALL_DIFFUSERS = dict(
    sample_size=16, in_channels=1, out_channels=2, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=16, norm_num_groups=8, norm_eps=1e-5)


def randomise(module, gen):
    # Non-default weights everywhere (diffusers zero-inits nothing here, but be explicit).
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5))


def test_cifar10_parameter_count():
    assert sum(p.numel() for p in DDPMUNet.cifar10().parameters()) == 35_746_307
    assert sum(p.numel() for p in diffusers.UNet2DModel(**CIFAR10_DIFFUSERS).parameters()) == 35_746_307


@pytest.mark.slow
def test_cifar10_matches_diffusers_forward(gen):
    unet = diffusers.UNet2DModel(**CIFAR10_DIFFUSERS).eval()
    ours = DDPMUNet.from_diffusers(unet)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        ref = unet.double()(x.double(), t).sample
        out = ours(x, t)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("source", ["module", "dir_safetensors", "dir_bin"])
def test_small_model_loads_and_matches(source, tmp_path, gen):
    unet = diffusers.UNet2DModel(**SMALL_DIFFUSERS).eval()
    randomise(unet, gen)
    if source == "module":
        ours = DDPMUNet.from_diffusers(unet)
    else:
        unet.save_pretrained(tmp_path, safe_serialization=source == "dir_safetensors")
        ours = DDPMUNet.from_diffusers(str(tmp_path))
    x = torch.randn(3, 1, 16, 16, generator=gen)
    with torch.no_grad():
        ref = unet.double()(x.double(), 17).sample
        out = ours(x, 17)
    assert out.shape == (3, 2, 16, 16)
    assert rel_err(out, ref) < 1e-5
    assert ours.sample_shape == (1, 16, 16)


def test_bad_checkpoints(tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="unet_or_dir"):
        DDPMUNet.from_diffusers(str(tmp_path / "missing"))
    unet = diffusers.UNet2DModel(**SMALL_DIFFUSERS)
    unet.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read weights"):
        DDPMUNet.from_diffusers(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DDPMUNet.from_diffusers(str(tmp_path))
    # a config that does not fit the weights
    unet.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["block_out_channels"] = [32, 96]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit the config"):
        DDPMUNet.from_diffusers(str(tmp_path))
    with pytest.raises(ValueError, match="time_embedding_type"):
        DDPMUNet.from_diffusers(diffusers.UNet2DModel(**dict(SMALL_DIFFUSERS, time_embedding_type="fourier")))
    with pytest.raises(TypeError, match="unet_or_dir"):
        DDPMUNet.from_diffusers(42)


def test_bad_config():
    with pytest.raises(ValueError, match="num_groups"):
        DDPMUNet(ch=48, num_groups=32)
    with pytest.raises(ValueError, match="ch_mult"):
        DDPMUNet(ch_mult=(1, 0))


def test_blocks_share_one_silu_of_the_time_embedding(gen):
    """The U-Net applies SiLU to temb once for all its blocks (two SiLUs a forward: the time MLP's and
    that one); a block handed it computes what it computes from temb alone, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Silus(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Silus.n += func is torch.ops.aten.silu.default
            return func(*args, **(kwargs or {}))

    net = DDPMUNet(in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,),
                   dropout=0.0, image_size=8, num_groups=4).eval()
    x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([5, 600])
    with torch.no_grad(), Silus():
        net(x, t)
    assert Silus.n == 2
    block = net.down_blocks[0].resnets[0]
    h, temb = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        assert torch.equal(block(h, temb), block(h, temb, torch.nn.functional.silu(temb)))
