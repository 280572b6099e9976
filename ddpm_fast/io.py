"""Loading a model to sample from, and writing samples (an .npz FID tools read, a PNG grid)."""

from __future__ import annotations

import json
import math
import os
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np
import torch

from .models import DDPMUNet
from .schedule import NoiseSchedule

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "digits16.pt")
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "learned_range": "learned_range"}


def load_for_sampling(path: Optional[str]) -> Tuple[DDPMUNet, NoiseSchedule, dict]:
    """(model, schedule, sampling options) from our checkpoint file, a diffusers UNet2DModel directory, or
    a diffusers pipeline directory (unet/ + scheduler/); None means the embedded digits model."""
    path = DEFAULT_MODEL if path is None else path
    if os.path.isfile(path):
        return DDPMUNet.load(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: {path!r} is neither a checkpoint file nor a diffusers directory")
    unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    model = DDPMUNet.from_diffusers(unet_dir)
    sched_cfg = {}
    for cand in (os.path.join(path, "scheduler", "scheduler_config.json"), os.path.join(path, "scheduler_config.json")):
        if os.path.isfile(cand):
            with open(cand) as f:
                sched_cfg = json.load(f)
            break
    schedule = NoiseSchedule.from_diffusers(sched_cfg)
    variance = sched_cfg.get("variance_type", "fixed_small")
    if variance not in VARIANCES:
        raise ValueError(f"model: scheduler variance_type {variance!r} is not supported "
                         f"(supported: {', '.join(VARIANCES)})")
    options = dict(prediction=sched_cfg.get("prediction_type", "epsilon"), variance=VARIANCES[variance],
                   clip_sample=sched_cfg.get("clip_sample", True), clip_range=sched_cfg.get("clip_sample_range", 1.0))
    return model, schedule, options


def image_grid(images_uint8: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid."""
    n, h, w, c = images_uint8.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = \
            images_uint8[i].numpy()
    return grid


def save_png(grid: np.ndarray, path: Union[str, BinaryIO], scale: int = 1) -> None:
    """Write a grid as PNG to a path or a binary file object."""
    from PIL import Image

    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, format="PNG")
