"""Checkpoint loading: diffusers UNet2DModel (module or saved directory) -> DDPMUNet."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Tuple

import torch

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def config_from_diffusers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Translate a UNet2DModel config into DDPMUNet arguments; raise on what DDPMUNet cannot express."""
    def need(key, allowed, default):
        v = cfg.get(key, default)
        if v not in allowed:
            raise ValueError(f"config: {key}={v!r} is not supported by DDPMUNet (supported: {allowed})")
        return v

    need("time_embedding_type", ("positional",), "positional")
    need("act_fn", ("silu", "swish"), "silu")
    need("resnet_time_scale_shift", ("default",), "default")
    need("class_embed_type", (None,), None)
    need("num_class_embeds", (None,), None)
    need("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    need("add_attention", (True,), True)
    need("downsample_type", ("conv",), "conv")
    need("upsample_type", ("conv",), "conv")
    boc = list(cfg["block_out_channels"])
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(f"config: block_out_channels {boc} are not multiples of the first")
    size = cfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"config: sample_size {size} must be square")
        size = size[0]
    downs = list(cfg["down_block_types"])
    attn_levels = []
    for i, kind in enumerate(downs):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ValueError(f"config: down block {kind!r} is not supported by DDPMUNet")
        if kind == "AttnDownBlock2D":
            attn_levels.append(i)
    ups = ["AttnUpBlock2D" if (len(downs) - 1 - i) in attn_levels else "UpBlock2D" for i in range(len(downs))]
    if list(cfg["up_block_types"]) != ups:
        raise ValueError(f"config: up_block_types {list(cfg['up_block_types'])} must mirror the down blocks: {ups}")
    groups = cfg.get("norm_num_groups", 32)
    attn_groups = cfg.get("attn_norm_num_groups")
    if groups is None or (attn_groups is not None and attn_groups != groups):
        raise ValueError("config: norm_num_groups must be set and attn_norm_num_groups must equal it")
    return dict(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), ch=ch,
        ch_mult=[c // ch for c in boc], num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=[size // 2**i for i in attn_levels], dropout=cfg.get("dropout", 0.0),
        resamp_with_conv=True, image_size=size, num_groups=groups, eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=cfg.get("downsample_padding", 1), attention_head_dim=cfg.get("attention_head_dim", 8),
        temb_dim=cfg.get("time_embedding_dim"), mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0),
        center_input_sample=cfg.get("center_input_sample", False))


def config_to_diffusers(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The UNet2DModel config of a DDPMUNet config: the inverse of config_from_diffusers."""
    if not config.get("resamp_with_conv", True):
        raise ValueError("config: resamp_with_conv=False (average-pool resampling) has no UNet2DModel equivalent")
    ch, mult, size = config["ch"], list(config["ch_mult"]), config["image_size"]
    attn = [size // 2**i in config["attn_resolutions"] for i in range(len(mult))]
    return dict(
        sample_size=size, in_channels=config["in_channels"], out_channels=config["out_channels"],
        center_input_sample=config.get("center_input_sample", False), time_embedding_type="positional",
        time_embedding_dim=config.get("temb_dim"), freq_shift=config.get("freq_shift", 1.0),
        flip_sin_to_cos=config.get("flip_sin_to_cos", False),
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=[ch * int(m) for m in mult], layers_per_block=config["num_res_blocks"],
        mid_block_scale_factor=config.get("mid_block_scale_factor", 1.0),
        downsample_padding=config.get("downsample_padding", 0), dropout=config.get("dropout", 0.0), act_fn="silu",
        attention_head_dim=config.get("attention_head_dim"), norm_num_groups=config["num_groups"],
        norm_eps=config.get("eps", 1e-6))


def save_diffusers(model, schedule, sampling: Mapping[str, Any], path: str) -> None:
    """Write a diffusers DDPMPipeline directory: unet/ (UNet2DModel config + safetensors weights),
    scheduler/ (a DDPMScheduler with these exact betas and sampling options) and model_index.json."""
    try:
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    except ImportError as e:
        raise RuntimeError(f"exporting to diffusers needs diffusers (pip install diffusers): {e}") from None
    unet = UNet2DModel(**config_to_diffusers(model.config))
    unet.load_state_dict({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, strict=True)
    variance = sampling.get("variance", "fixed_small")
    scheduler = DDPMScheduler(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.tolist(),
                              variance_type=variance, prediction_type=sampling.get("prediction", "epsilon"),
                              clip_sample=bool(sampling.get("clip_sample", True)),
                              clip_sample_range=float(sampling.get("clip_range", 1.0)))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)


def read_diffusers_dir(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"unet_or_dir: {path!r} is not a directory holding config.json and weights")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"unet_or_dir: no config.json in {path!r}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"unet_or_dir: {cfg_path} is not valid JSON ({e})") from None
    for name in WEIGHT_FILES:
        wpath = os.path.join(path, name)
        if os.path.isfile(wpath):
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return cfg, load_file(wpath)
                return cfg, torch.load(wpath, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: say which, not a deep traceback
                raise ValueError(f"unet_or_dir: cannot read weights {wpath} ({type(e).__name__}: {e})") from None
    raise FileNotFoundError(f"unet_or_dir: no weights in {path!r} (looked for {', '.join(WEIGHT_FILES)})")


def load_diffusers(cls, unet_or_dir):
    if isinstance(unet_or_dir, (str, os.PathLike)):
        cfg, state = read_diffusers_dir(os.fspath(unet_or_dir))
    elif hasattr(unet_or_dir, "config") and hasattr(unet_or_dir, "state_dict"):
        cfg, state = dict(unet_or_dir.config), unet_or_dir.state_dict()
    else:
        raise TypeError(f"unet_or_dir: expected a diffusers UNet2DModel or a directory, got {type(unet_or_dir).__name__}")
    model = cls(**config_from_diffusers(cfg))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"unet_or_dir: the weights do not fit the config: {e}") from None
    return model.eval()


CHECKPOINT_FORMAT = "ddpm-fast/unet-v1"


def save_checkpoint(path: str, model, schedule, sampling: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """One file: the U-Net's config and weights, the betas it was trained with, and how to sample it."""
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "betas": schedule.betas.clone(), "sampling": dict(sampling), "meta": dict(meta)}, path)


def load_checkpoint(cls, path: str):
    """(model, schedule, sampling options) from a file written by save_checkpoint."""
    from ..schedule import NoiseSchedule

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model: no checkpoint file at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file at all
        raise ValueError(f"model: cannot read checkpoint {path!r} ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"model: {path!r} is not a ddpm-fast checkpoint (format {CHECKPOINT_FORMAT})")
    try:
        model = cls(**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"model: the checkpoint's weights do not fit its config: {e}") from None
    return model.eval(), NoiseSchedule(ckpt["betas"]), dict(ckpt.get("sampling", {}))
