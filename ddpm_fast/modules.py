"""Drop-in modules over the fused ops, and accelerate(model)."""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn as nn

from . import ops


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by ddpm_fast.group_norm: same constructor, parameters and state_dict.

    forward(x, add=None, scale=None, shift=None) also takes the fused per-(sample, channel) input
    add and scale-shift of ddpm_fast.group_norm.
    """

    silu = False

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, add=add, scale=scale, shift=shift,
                              silu=self.silu)

    @classmethod
    def wrap(cls, norm: nn.GroupNorm) -> "FusedGroupNorm":
        """The fused module over the same Parameter objects as ``norm`` (no copy)."""
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, affine=False)
        fused.affine = norm.affine
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused


class FusedGroupNormSiLU(FusedGroupNorm):
    """FusedGroupNorm followed by SiLU, in one kernel."""

    silu = True


def _is_silu(m: nn.Module) -> bool:
    return isinstance(m, nn.SiLU) or getattr(m, "__name__", None) == "silu" or m is torch.nn.functional.silu


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args, **kwargs):
    # diffusers' ResnetBlock2D.forward with GroupNorm+SiLU fused and the time embedding folded into
    # norm2 (as its input add, or its scale-shift).  self.nonlinearity still serves temb.
    h = self.norm1(input_tensor)
    if self.upsample is not None:
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None and temb is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb).to(h.dtype)
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError("temb: required when time_embedding_norm is 'scale_shift'")
        scale, shift = torch.chunk(temb, 2, dim=1)
        h = self.norm2(h, scale=scale, shift=shift)
    else:
        h = self.norm2(h, add=temb if self.time_emb_proj is not None and temb is not None else None)
    h = self.conv2(self.dropout(h))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def accelerate(model: nn.Module) -> nn.Module:
    """Patch ``model`` in place for the fused kernels and return it; weights are untouched.

    - our DDPMUNet is built from the fused modules already and is returned as is;
    - a diffusers UNet2DModel: in every ResnetBlock2D with SiLU, norm1 + SiLU and norm2 + SiLU
      become one FusedGroupNormSiLU each and the time-embedding add (or scale-shift) moves into
      norm2; conv_norm_out + conv_act become one FusedGroupNormSiLU.  The SiLU module the block
      also applies to the time embedding is kept for that.
    """
    from .models import DDPMUNet

    if isinstance(model, DDPMUNet):
        return model
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError as e:
        raise TypeError(f"model: expected a DDPMUNet or a diffusers UNet2DModel ({e})") from None
    if not any(isinstance(m, ResnetBlock2D) for m in model.modules()):
        raise TypeError(f"model: expected a DDPMUNet or a diffusers UNet2DModel, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, ResnetBlock2D) and _is_silu(m.nonlinearity) and not isinstance(m.norm1, FusedGroupNorm) \
                and isinstance(m.norm1, nn.GroupNorm) and isinstance(m.norm2, nn.GroupNorm) \
                and m.time_embedding_norm in ("default", "scale_shift"):
            m.norm1 = FusedGroupNormSiLU.wrap(m.norm1)
            m.norm2 = FusedGroupNormSiLU.wrap(m.norm2)
            m.forward = types.MethodType(_fused_resnet_forward, m)
    if isinstance(getattr(model, "conv_norm_out", None), nn.GroupNorm) and not isinstance(
            model.conv_norm_out, FusedGroupNorm) and _is_silu(getattr(model, "conv_act", None)):
        model.conv_norm_out = FusedGroupNormSiLU.wrap(model.conv_norm_out)
        model.conv_act = nn.Identity()
    return model
