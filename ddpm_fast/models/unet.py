"""The DDPM U-Net (Ho et al. 2020), built from ddpm_fast.ops.

Constructor arguments use the original code's names.  Submodules carry the names of
diffusers' UNet2DModel, so a diffusers checkpoint of the same architecture loads as is
(``DDPMUNet.from_diffusers``) and ``accelerate`` can treat both models alike.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..modules import FusedGroupNorm, FusedGroupNormSiLU, QKVCache, fused_attention_block


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t [B] -> [B, dim] (sin then cos, as the original code)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, + temb (fused into the second GN as its input add), GN-SiLU-dropout-conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float, dropout: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = FusedGroupNormSiLU(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = FusedGroupNormSiLU(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor, temb_act: Optional[torch.Tensor] = None) -> torch.Tensor:
        """temb_act: SiLU(temb), when the caller has it (the U-Net makes it once for all its blocks)."""
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, add=self.time_emb_proj(F.silu(temb) if temb_act is None else temb_act).to(h.dtype))
        h = self.conv2(self.dropout(h))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class AttentionBlock(nn.Module):
    """GroupNorm, q/k/v projections, softmax attention over the H*W tokens, output projection, + x."""

    def __init__(self, channels: int, groups: int, eps: float, head_dim: Optional[int] = None,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        head_dim = channels if head_dim is None else head_dim
        if channels % head_dim:
            raise ValueError(f"attention_head_dim: {channels} channels are not divisible by {head_dim}")
        self.heads = channels // head_dim
        self.group_norm = FusedGroupNorm(groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.rescale_output_factor = rescale_output_factor
        self._qkv = QKVCache()

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return fused_attention_block(x, self.group_norm, self.to_q, self.to_k, self.to_v, self.to_out[0],
                                         self.heads, self._qkv, rescale_output_factor=self.rescale_output_factor)
        B, C, H, W = x.shape
        tokens = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(tokens).reshape(B, H * W, self.heads, C // self.heads).transpose(1, 2)

        o = ops.attention(heads(self.to_q), heads(self.to_k), heads(self.to_v))
        o = self.to_out[0](o.transpose(1, 2).reshape(B, H * W, C))
        out = o.transpose(1, 2).reshape(B, C, H, W) + x
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out


class Downsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding) if with_conv else nn.AvgPool2d(2, 2)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # the original code's asymmetric "same" padding
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class _Level(nn.Module):
    """One resolution of the U-Net: resnets (+ attentions), then an optional resampler."""

    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()


class DDPMUNet(nn.Module):
    """The DDPM U-Net; ``forward(x, t)`` returns the model output (ε by default) [B, out_channels, H, W]."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        image_size: int = 32,
        num_groups: int = 32,
        eps: float = 1e-6,
        *,
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1.0,
        downsample_padding: int = 0,
        attention_head_dim: Optional[int] = None,
        temb_dim: Optional[int] = None,
        mid_block_scale_factor: float = 1.0,
        center_input_sample: bool = False,
    ):
        super().__init__()
        self.config: Dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions), dropout=dropout,
            resamp_with_conv=resamp_with_conv, image_size=image_size, num_groups=num_groups, eps=eps,
            flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, downsample_padding=downsample_padding,
            attention_head_dim=attention_head_dim, temb_dim=temb_dim,
            mid_block_scale_factor=mid_block_scale_factor, center_input_sample=center_input_sample)
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "image_size", "num_groups"):
            v = self.config[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not ch_mult or any(int(m) != m or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult: expected positive ints, got {ch_mult!r}")
        chans = [ch * int(m) for m in ch_mult]
        if any(c % num_groups for c in chans):
            raise ValueError(f"num_groups: every level's channels {chans} must be divisible by {num_groups}")
        temb_dim = temb_dim or 4 * ch
        attn_kw = dict(groups=num_groups, eps=eps)

        def attn(c):
            return AttentionBlock(c, head_dim=attention_head_dim, **attn_kw)

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch, temb_dim)

        res_kw = dict(temb_dim=temb_dim, groups=num_groups, eps=eps, dropout=dropout)
        self.down_blocks = nn.ModuleList()
        prev, res = ch, image_size
        for i, c in enumerate(chans):
            level = _Level()
            for j in range(num_res_blocks):
                level.resnets.append(ResnetBlock(prev if j == 0 else c, c, **res_kw))
                if res in attn_resolutions:
                    level.attentions.append(attn(c))
            if i < len(chans) - 1:
                level.downsamplers = nn.ModuleList([Downsample(c, resamp_with_conv, downsample_padding)])
                res //= 2
            self.down_blocks.append(level)
            prev = c

        self.mid_block = _Level()
        self.mid_block.resnets.extend([ResnetBlock(chans[-1], chans[-1], output_scale_factor=mid_block_scale_factor,
                                                   **res_kw) for _ in range(2)])
        self.mid_block.attentions.append(attn(chans[-1]))

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        prev_out = rev[0]
        for i, c in enumerate(rev):
            skip_in = rev[min(i + 1, len(rev) - 1)]
            level = _Level()
            for j in range(num_res_blocks + 1):
                skip = skip_in if j == num_res_blocks else c
                level.resnets.append(ResnetBlock((prev_out if j == 0 else c) + skip, c, **res_kw))
                if res in attn_resolutions:
                    level.attentions.append(attn(c))
            if i < len(rev) - 1:
                level.upsamplers = nn.ModuleList([Upsample(c, resamp_with_conv)])
                res *= 2
            self.up_blocks.append(level)
            prev_out = c

        self.conv_norm_out = FusedGroupNormSiLU(num_groups, ch, eps)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    # ------------------------------------------------------------------ builders
    @classmethod
    def cifar10(cls, **overrides) -> "DDPMUNet":
        """The original CIFAR-10 model (35,746,307 parameters)."""
        cfg = dict(in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True, image_size=32)
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_diffusers(cls, unet_or_dir) -> "DDPMUNet":
        """Load a diffusers UNet2DModel (the module, or its saved directory) of the DDPM architecture."""
        from .loading import load_diffusers

        return load_diffusers(cls, unet_or_dir)

    def save(self, path: str, schedule, sampling: Optional[Dict[str, Any]] = None, **meta) -> None:
        """Write a single-file checkpoint: config, weights, betas and sampling options."""
        from .loading import save_checkpoint

        save_checkpoint(path, self, schedule, sampling or {}, meta)

    @classmethod
    def load(cls, path: str):
        """(model, NoiseSchedule, sampling options) from a file written by ``save``."""
        from .loading import load_checkpoint

        return load_checkpoint(cls, path)

    # ------------------------------------------------------------------- forward
    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        s = self.config["image_size"]
        return (self.config["in_channels"], s, s)

    def forward(self, x: torch.Tensor, t: Union[int, torch.Tensor]) -> torch.Tensor:
        if self.config["center_input_sample"]:
            x = 2 * x - 1.0
        B = x.shape[0]
        if not isinstance(t, torch.Tensor):  # a kernel argument, not a host-to-device copy (capturable)
            t = torch.full((1,), t, device=x.device)
        t = t.reshape(-1).to(x.device).expand(B)
        emb = timestep_embedding(t, self.config["ch"], self.config["flip_sin_to_cos"], self.config["freq_shift"])
        temb = self.time_embedding(emb.to(self.conv_in.weight.dtype))
        act = F.silu(temb)  # what every block's projection reads: one launch, not one a block

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, temb, act)
                if len(level.attentions):
                    h = level.attentions[j](h)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)

        h = self.mid_block.resnets[0](h, temb, act)
        h = self.mid_block.attentions[0](h)
        h = self.mid_block.resnets[1](h, temb, act)

        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), temb, act)
                if len(level.attentions):
                    h = level.attentions[j](h)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)

        return self.conv_out(self.conv_norm_out(h))
