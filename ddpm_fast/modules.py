"""Drop-in modules over the fused ops, and accelerate(model)."""

from __future__ import annotations

import inspect
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


class QKVCache:
    """cat(W_q, W_k, W_v) and cat(b_q, b_k, b_v) in the dtype the GEMM runs in, for one GEMM: one
    entry per dtype, rebuilt when a weight changes (its version counter moves).  An entry outlives
    calls in other dtypes, so a CUDA graph that reads one by address (the sampler's, in bf16) keeps
    its weights while the model also runs in float32.  The modules' own parameters are never touched."""

    def __init__(self):
        self.entries = {}  # dtype -> (key, w, b)

    def get(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, dtype: torch.dtype):
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for m in (q, k, v) for p in (m.weight, m.bias))
        entry = self.entries.get(dtype)
        if entry is None or entry[0] != key:
            w = torch.cat([q.weight, k.weight, v.weight]).detach().to(dtype)
            b = torch.cat([q.bias, k.bias, v.bias]).detach().to(dtype)
            entry = self.entries[dtype] = (key, w, b)
        return entry[1], entry[2]


def fused_attention_block(x: torch.Tensor, norm: nn.GroupNorm, q: nn.Linear, k: nn.Linear, v: nn.Linear,
                          out: nn.Linear, heads: int, cache: QKVCache, scale: Optional[float] = None,
                          rescale_output_factor: float = 1.0, residual: bool = True) -> torch.Tensor:
    """The U-Net's self-attention block on x [B, C, H, W] in four GEMM/kernel launches (+ a bias add):
    fused GroupNorm; one GEMM for q, k and v (bias in its epilogue) read through a transposed view of
    the normalised map; the fused attention on strided views of that GEMM's output; the output
    projection as a batched GEMM whose epilogue adds the residual x.  The result is x's shape in
    channels_last strides (a view of the [B, L, C] GEMM output)."""
    B, C, H, W = x.shape
    L = H * W
    h = ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    w_qkv, b_qkv = cache.get(q, k, v, h.dtype)
    qkv = torch.nn.functional.linear(h.reshape(B, C, L).transpose(1, 2), w_qkv, b_qkv)
    d = C // heads
    q_, k_, v_ = (t.reshape(B, L, heads, d).transpose(1, 2) for t in qkv.split(C, dim=-1))
    o = ops.attention(q_, k_, v_, scale=scale).transpose(1, 2).reshape(B, L, C)
    w_o = out.weight.to(o.dtype).t().expand(B, C, C)
    if residual:
        y = torch.baddbmm(x.reshape(B, C, L).transpose(1, 2).to(o.dtype), o, w_o)
    else:
        y = torch.bmm(o, w_o)
    y = y.add_(out.bias.to(y.dtype))
    if rescale_output_factor != 1.0:
        y = y.div_(rescale_output_factor)
    return y.transpose(1, 2).reshape(B, C, H, W)


class FusedAttnProcessor:
    """A diffusers attention processor running fused_attention_block for the U-Net's spatial
    self-attention (4-D input, no encoder states, no mask, a group norm); anything else, and any
    call that needs autograd, goes to diffusers' own AttnProcessor2_0.  In training that is torch's
    scaled_dot_product_attention and its backward (our attention kernels are forward-only), with
    the block's GroupNorm on our kernels once accelerate() has made it a FusedGroupNorm."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()
        self.cache = QKVCache()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        plain = (hidden_states.dim() == 4 and encoder_hidden_states is None and attention_mask is None
                 and attn.group_norm is not None and getattr(attn, "spatial_norm", None) is None
                 and not getattr(attn, "norm_cross", False) and attn.to_q.bias is not None
                 and attn.to_out[0].bias is not None and not torch.is_grad_enabled())
        if not plain:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return fused_attention_block(hidden_states, attn.group_norm, attn.to_q, attn.to_k, attn.to_v, attn.to_out[0],
                                     attn.heads, self.cache, scale=attn.scale,
                                     rescale_output_factor=attn.rescale_output_factor,
                                     residual=attn.residual_connection)

    # diffusers' Attention.forward takes inspect.signature(processor.__call__) on every call, to sort its
    # kwargs; a stored signature makes that a lookup (it was a fifth of a small block's host time).
    __call__.__signature__ = inspect.signature(__call__)


def _is_silu(m: nn.Module) -> bool:
    return isinstance(m, nn.SiLU) or getattr(m, "__name__", None) == "silu" or m is torch.nn.functional.silu


def _fused_resnet_forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args, **kwargs):
    # diffusers' ResnetBlock2D.forward with GroupNorm+SiLU fused and the time embedding folded into
    # norm2 (as its input add, or its scale-shift).  self.nonlinearity still serves temb.
    h = self.norm1(input_tensor)
    if self.upsample is not None:
        if input_tensor.shape[0] >= 64:  # as diffusers does: channels_last nearest upsampling fails at large batches
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
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
      also applies to the time embedding is kept for that.  Every Attention module gets a
      FusedAttnProcessor (set_processor), which honours residual_connection,
      rescale_output_factor and the group norm, and its group norm becomes a FusedGroupNorm.

    Training runs the kernels too: the GroupNorm kernels have a backward, so with autograd on
    the patched model computes its norms (and their SiLU, add and scale-shift) and their gradients
    with them; attention then runs torch's scaled_dot_product_attention, whose backward serves.
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
    from diffusers.models.attention_processor import Attention

    for m in model.modules():
        if isinstance(m, Attention) and not isinstance(m.processor, FusedAttnProcessor):
            m.set_processor(FusedAttnProcessor())
        if isinstance(m, Attention) and type(m.group_norm) is nn.GroupNorm:
            m.group_norm = FusedGroupNorm.wrap(m.group_norm)
    if isinstance(getattr(model, "conv_norm_out", None), nn.GroupNorm) and not isinstance(
            model.conv_norm_out, FusedGroupNorm) and _is_silu(getattr(model, "conv_act", None)):
        model.conv_norm_out = FusedGroupNormSiLU.wrap(model.conv_norm_out)
        model.conv_act = nn.Identity()
    return model
