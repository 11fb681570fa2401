"""uint8 images with per-channel mean and std: the normalization the fused ops apply on the fly.

A batch can cross to the GPU and live there as uint8 (a quarter of float32's bytes);
:func:`mae_fast.ops.gather_patches` and :func:`mae_fast.ops.masked_patch_loss` take it with
``mean`` and ``std`` and compute ``(x - mean[c]) / std[c]`` in float32 as they read each pixel,
bit for bit what :func:`normalize_images` gives before calling them on float images.
"""

from __future__ import annotations

from typing import Sequence

import torch

#: The ImageNet statistics in the 0-255 scale of uint8 pixels (the official MAE normalization).
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize_images(imgs: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                     std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``(imgs - mean[c]) / std[c]`` in float32: the definition of the ops' uint8 input.

    Args:
        imgs: [B, C, H, W] uint8 (any strides: an NHWC batch viewed as NCHW with ``permute(0, 3, 1, 2)``).
        mean, std: C values each, in the 0-255 scale (sequences, or float32 tensors already on the
            device of ``imgs``, which the training step uses to avoid a copy per step).
    """
    stats = image_stats(imgs, mean, std)
    return (imgs.to(torch.float32) - stats[0].view(1, -1, 1, 1)) / stats[1].view(1, -1, 1, 1)


def image_stats(imgs: torch.Tensor, mean, std) -> torch.Tensor | None:
    """Validate ``mean``/``std`` for ``imgs`` and return them as one [2, C] float32 tensor on its device.

    Float images take neither (None is returned); uint8 images need both.

    Raises:
        TypeError / ValueError: naming the argument and the value.
    """
    if imgs.dtype != torch.uint8:
        if mean is not None or std is not None:
            raise ValueError(f"mean and std are for uint8 imgs; got imgs of dtype {imgs.dtype} (normalize float "
                             "images before the op instead)")
        return None
    if mean is None or std is None:
        raise ValueError("uint8 imgs need mean and std (C values each, in the 0-255 scale), got "
                         f"mean={mean!r}, std={std!r}")
    C = imgs.shape[1]
    rows = []
    for name, value in (("mean", mean), ("std", std)):
        if not isinstance(value, torch.Tensor):  # checked on the host; a tensor is trusted (no device sync)
            values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            if len(values) != C:
                raise ValueError(f"{name} must hold {C} values (one per channel of imgs), got {value!r}")
            if name == "std" and not all(v > 0 for v in values):
                raise ValueError(f"std must be positive, got {value!r}")
        t = torch.as_tensor(value, dtype=torch.float32, device=imgs.device).reshape(-1)
        if t.numel() != C:
            raise ValueError(f"{name} must hold {C} values (one per channel of imgs), got {t.numel()}")
        rows.append(t)
    return torch.stack(rows)
