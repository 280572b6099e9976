"""The embedded default model's data: scikit-learn's 8x8 handwritten digits (shipped inside the
package, nothing downloaded), upscaled to 16x16 and scaled to [-1, 1]."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


def load_digits(image_size: int = IMAGE_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, S, S] float32 in [-1, 1], labels [N] int64)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise RuntimeError("the digits data set needs scikit-learn (pip install scikit-learn)") from e
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(d.target, dtype=torch.int64)


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [N, 1, S, S] -> the 8x8 [0, 16] features the digits classifier is trained on."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    return (F.adaptive_avg_pool2d(x, 8) * 16).reshape(len(images), -1)
