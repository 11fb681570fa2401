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
