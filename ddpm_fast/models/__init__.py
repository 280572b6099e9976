"""The DDPM U-Net built from ddpm_fast.ops, and checkpoint loaders."""

from .unet import AttentionBlock, DDPMUNet, ResnetBlock

__all__ = ["AttentionBlock", "DDPMUNet", "ResnetBlock"]
