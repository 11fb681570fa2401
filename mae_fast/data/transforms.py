"""The official MAE augmentation for the PyTorch loader, with an explicit random generator.

``RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)`` then a horizontal flip with
probability 1/2, as the official ``main_pretrain.py``; normalization (ImageNet mean and std)
happens on the device. Drawing from a per-sample generator keeps augmentation identical however
samples are spread over worker processes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=SCALE,
                            ratio=RATIO) -> tuple[int, int, int, int]:
    """Crop box (left, top, crop_width, crop_height) drawn as torchvision's RandomResizedCrop draws it.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; if
    none fits, a center crop clamped to ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def slot_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """float64 [len(seeds), count] in [0, 1): ``count`` draws per seed, a fixed function of the seed alone (splitmix64
    of seed and draw number), so they are the same whichever batch, rank or process computes them."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    state = np.asarray(seeds, dtype=np.int64).astype(np.uint64)[:, None] + \
        (np.arange(1, count + 1, dtype=np.uint64) * golden)[None, :]
    z = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def train_crops(widths, heights, seeds, scale=SCALE, ratio=RATIO) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop boxes and flips of a batch, each drawn from its slot's seed alone (:func:`slot_uniforms`), with
    :func:`random_resized_crop_box`'s distribution: ten tries at an area fraction in ``scale`` and a log-uniform
    aspect in ``ratio``, the first that fits, else a centre crop clamped to ``ratio``; then a flip with
    probability 1/2. Vectorized: a few microseconds a batch, for the DALI loader's main process.

    Args:
        widths, heights: int [B], the images' sizes.
        seeds: int [B], the slots' augmentation seeds (see :mod:`mae_fast.data.sampler`).

    Returns:
        ``boxes`` int64 [B, 4] (left, top, width, height), ``flips`` bool [B], ``fitted`` bool [B] (False where
        the centre crop was taken).
    """
    width = np.asarray(widths, dtype=np.float64)[:, None]
    height = np.asarray(heights, dtype=np.float64)[:, None]
    u = slot_uniforms(seeds, 23)
    target = width * height * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 10:20])
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(len(first))
    fitted = fits.any(axis=1)
    w, h = w[rows, first], h[rows, first]
    width, height = width[:, 0], height[:, 0]
    left = np.floor(u[:, 20] * (width - w + 1))
    top = np.floor(u[:, 21] * (height - h + 1))
    in_ratio = width / height
    centre_w = np.where(in_ratio > max(ratio), np.round(height * max(ratio)), width)
    centre_h = np.where(in_ratio < min(ratio), np.round(width / min(ratio)), height)
    w, h = np.where(fitted, w, centre_w), np.where(fitted, h, centre_h)
    left = np.where(fitted, left, (width - w) // 2)
    top = np.where(fitted, top, (height - h) // 2)
    boxes = np.stack([left, top, w, h], axis=1).astype(np.int64)
    return boxes, u[:, 22] < 0.5, fitted


def train_transform(img, size: int, seed: int) -> torch.Tensor:
    """PIL RGB image -> uint8 [3, size, size]: random resized crop (bicubic) and random flip."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng)
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)


def eval_transform(img, size: int) -> torch.Tensor:
    """PIL RGB image -> uint8 [3, size, size]: shorter side resized to ``size`` (bicubic), center crop."""
    from PIL import Image

    scale = size / min(img.width, img.height)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 or [0, 255] float images [B, 3, H, W] -> ImageNet-normalized ``dtype`` (computed in float32).

    The same arithmetic as :func:`mae_fast.ops.normalize_images` with the model's default
    statistics, so a uint8 batch normalized inside the fused ops equals one normalized here.
    """
    from mae_fast.ops.normalize import IMAGENET_MEAN_255, IMAGENET_STD_255

    mean = torch.tensor(IMAGENET_MEAN_255, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return ((images.to(torch.float32) - mean) / std).to(dtype)
