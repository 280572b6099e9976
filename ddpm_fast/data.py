"""Training data: the embedded default model's digits (scikit-learn's 8x8 handwritten digits,
shipped inside the package, nothing downloaded, upscaled to 16x16 and scaled to [-1, 1]), a folder
of users' images, and the order a training run reads them in."""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
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


# ------------------------------------------------------------------ users' images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFolder(torch.utils.data.Dataset):
    """Every PNG/JPEG under ``root``, at any depth, in the order of their sorted relative paths.

    ``dataset[(i, flip)]`` is image i as uint8 [C, S, S]: converted to RGB (C = 3) or greyscale
    (C = 1), centre-cropped to a square, resized to S x S (bicubic, antialiased when shrinking) and
    mirrored left-right when ``flip``.  Files are decoded when read, so any number of images fits."""

    def __init__(self, root: str, image_size: int, channels: int = 3):
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ImportError("data: reading images needs Pillow (pip install pillow)") from None
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data: {root!r} is not a directory")
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (greyscale) or 3 (RGB) for images, got {channels}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
        self.root, self.image_size, self.channels = root, image_size, channels
        self.files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root, followlinks=True)
                            for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise ValueError(f"data: no PNG or JPEG images under {root!r}")

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """A digest of the file list and sizes: a resumed run checks it still reads the same images."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f}\0{os.path.getsize(os.path.join(self.root, f))}\0".encode())
        return f"{len(self.files)} images, sha256 {h.hexdigest()[:16]}"

    def __getitem__(self, key: Tuple[int, bool]) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        i, flip = key
        path = os.path.join(self.root, self.files[i])
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if self.channels == 3 else "L")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"data: cannot read image {path!r} ({e})") from None
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # Crop first: resize(box=...) would let the filter reach the pixels outside the square.
        img = img.crop((left, top, left + side, top + side)).resize((self.image_size, self.image_size),
                                                                    Image.Resampling.BICUBIC)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return x.reshape(self.image_size, self.image_size, self.channels).permute(2, 0, 1).contiguous()


class DataOrder:
    """Which images, mirrored or not, and which timesteps make up step k's batch: a function of
    (seed, k) alone, so a resumed run sees what an uninterrupted one would.

    The run's sample g = k * batch_size + b is position g % n of epoch g // n, whose order, flips and
    timesteps are drawn from numpy's PCG64 seeded with (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, num_timesteps: int, flip: bool):
        self.n, self.batch_size, self.seed, self.num_timesteps, self.flip = n, batch_size, seed, num_timesteps, flip
        self._epoch: Optional[Tuple[int, np.ndarray, np.ndarray, np.ndarray]] = None

    def epoch(self, e: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != e:
            rng = np.random.default_rng([self.seed, e])
            order = rng.permutation(self.n)
            flips = rng.random(self.n) < 0.5
            t = rng.integers(0, self.num_timesteps, self.n)
            self._epoch = (e, order, flips & self.flip, t)
        return self._epoch[1:]

    def batch(self, step: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image indices, flips, timesteps), each [batch_size], for step ``step``."""
        g = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        idx, flips, t = (np.empty(len(g), dtype=np.int64) for _ in range(3))
        for e in np.unique(g // self.n):
            sel = g // self.n == e
            order, f, tt = self.epoch(int(e))
            pos = g[sel] % self.n
            idx[sel], flips[sel], t[sel] = order[pos], f[pos], tt[pos]
        return torch.from_numpy(idx), torch.from_numpy(flips.astype(bool)), torch.from_numpy(t)

    def state(self, step: int) -> Dict[str, int]:
        """Where step ``step`` starts: what a checkpoint records of the data order."""
        g = step * self.batch_size
        return dict(seed=self.seed, n=self.n, batch_size=self.batch_size, epoch=g // self.n, position=g % self.n)


def batches(data, order: DataOrder, start: int, stop: int, workers: int = 0,
            pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, timesteps) for steps start .. stop - 1.  ``data`` is a tensor [N, C, H, W] in
    memory (gathered and flipped here) or an ImageFolder (read by ``workers`` DataLoader
    processes, ahead of the training step)."""
    if isinstance(data, torch.Tensor):
        for step in range(start, stop):
            idx, flips, t = order.batch(step)
            x = data[idx]
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
            # Pinned, so the step's non-blocking copy to the GPU does not wait for the host.
            yield (x.pin_memory() if pin_memory else x), t
        return

    class Keys(torch.utils.data.Sampler):
        def __iter__(self):
            for step in range(start, stop):
                idx, flips, _ = order.batch(step)
                yield list(zip(idx.tolist(), flips.tolist()))

        def __len__(self):
            return stop - start

    # A generator of its own: a DataLoader otherwise draws its base seed from torch's global RNG,
    # which dropout uses, and a resumed run would then drop out differently.
    loader = torch.utils.data.DataLoader(data, batch_sampler=Keys(), num_workers=workers, pin_memory=pin_memory,
                                         generator=torch.Generator())
    for step, images in zip(range(start, stop), loader):
        yield images, order.batch(step)[2]


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch from ``batches`` -> float32 in [-1, 1] on ``device`` (uint8 crosses the bus as uint8)."""
    images = images.to(device, non_blocking=True)
    return images.float().div_(127.5).sub_(1.0) if images.dtype == torch.uint8 else images.float()
