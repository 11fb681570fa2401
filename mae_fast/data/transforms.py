"""The official MAE augmentations, with explicit random generators.

Pretraining: ``RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)`` then a
horizontal flip with probability 1/2, as the official ``main_pretrain.py``; normalization (ImageNet
mean and std) happens on the device. Drawing from a per-sample generator keeps augmentation
identical however samples are spread over worker processes.

Fine-tuning: the official ``main_finetune.py`` transforms (timm's ``create_transform`` for
training, resize and center crop for evaluation), split where the image becomes a tensor (see the
section below), with every random draw following the slot's seed.
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


def train_crops(widths, heights, seeds, scale=SCALE, ratio=RATIO,
                flip_p: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop boxes and flips of a batch, each drawn from its slot's seed alone (:func:`slot_uniforms`), with
    :func:`random_resized_crop_box`'s distribution: ten tries at an area fraction in ``scale`` and a log-uniform
    aspect in ``ratio``, the first that fits, else a centre crop clamped to ``ratio``; then a flip with
    probability ``flip_p``. Vectorized: a few microseconds a batch, for the DALI loader's main process.

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
    return boxes, u[:, 22] < flip_p, fitted


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


# ---------------------------------------------------------------------------------------------- fine-tuning
#
# The official main_finetune.py builds its transforms with timm's create_transform (training) and a resize and
# center crop (evaluation). The loaders keep the uint8 transport of pretraining: the PIL part of each runs where the
# image is decoded, the uint8 pixels cross to the device, and normalization (and, in training, random erasing) runs
# there on the batch.

#: The official evaluation crop: the shorter side is resized to ``input_size / EVAL_CROP_PCT`` for input sizes up
#: to 224 (``crop_pct = 224 / 256``), to ``input_size`` above that.
EVAL_CROP_PCT = 224 / 256


def eval_resize_size(input_size: int) -> int:
    """The shorter side the official evaluation transform resizes to before its center crop of ``input_size``."""
    crop_pct = EVAL_CROP_PCT if input_size <= 224 else 1.0
    return int(input_size / crop_pct)


def eval_geometry(width: int, height: int, input_size: int) -> tuple[int, int, int, int]:
    """``(resized_width, resized_height, left, top)`` of the official evaluation transform for an image of
    ``width`` x ``height``: torchvision's ``Resize(eval_resize_size(input_size))`` (shorter side to that size, the
    longer one scaled and truncated) then ``CenterCrop(input_size)`` (offsets rounded half to even)."""
    short = eval_resize_size(input_size)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    return new_w, new_h, int(round((new_w - input_size) / 2.0)), int(round((new_h - input_size) / 2.0))


def _timm(what: str):
    try:
        import timm.data  # noqa: F401
    except ImportError as exc:
        from mae_fast.errors import BackendUnavailableError

        raise BackendUnavailableError(f"{what} needs timm ({exc}); pip install timm") from exc
    return timm.data


def official_train_transform(input_size: int, aug):
    """The official ``build_transform(is_train=True)``, split at ToTensor: timm's
    ``create_transform(input_size, is_training=True, hflip=aug.hflip, color_jitter=aug.color_jitter,
    auto_augment=aug.auto_augment, interpolation="bicubic", re_prob=aug.reprob, re_mode=aug.remode,
    re_count=aug.recount, mean, std)`` built with ``separate=True`` (the official script leaves ``hflip`` at timm's
    0.5, :class:`~mae_fast.config.AugConfig`'s default).

    Returns:
        ``(primary, secondary, final)``: timm's three ``Compose`` objects (random resized crop at scale (0.08, 1) and
        flip, the flip left out at ``hflip`` 0; RandAugment or color jitter; ToTensor, Normalize and
        RandomErasing).

    Raises:
        ConfigError: ``aug.aa`` is a policy timm cannot parse (named).
        BackendUnavailableError: timm is not installed.
    """
    from mae_fast.errors import ConfigError

    data = _timm("the fine-tuning augmentation")
    try:
        parts = data.create_transform(input_size, is_training=True, hflip=aug.hflip, color_jitter=aug.color_jitter,
                                      auto_augment=aug.auto_augment, interpolation="bicubic", re_prob=aug.reprob,
                                      re_mode=aug.remode, re_count=aug.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                      separate=True)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        why = f" ({exc})" if str(exc) else ""
        raise ConfigError(f"--aa: timm cannot parse the policy {aug.aa!r}{why}; give a policy such as "
                          "rand-m9-mstd0.5-inc1 (the official default), or none") from None
    for transform in parts[1].transforms:
        for op in getattr(transform, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
    return parts


def posterize_any_bits(img, bits_to_keep: int, **_):
    """timm's posterize, with the Pillow it was written for: keeping 0 bits gives a black image. The official
    policy's increasing posterize reaches 0 bits at the top of its magnitude noise, which Pillow 10.3 and later
    refuse with a ValueError (timm passes the 0 on), so a long fine-tune would stop on that draw."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _seeded(seed: int, call):
    """``call()`` with Python's, NumPy's and torch's CPU generators seeded by ``seed``, their states restored after
    (a loader running in the main process leaves the training's random state as it was)."""
    import random

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.random.default_generator.manual_seed(seed)
        return call()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


def _to_uint8(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class FinetuneTrainTransform:
    """The PIL part of the official training transform: PIL RGB image and slot seed -> uint8 [3, S, S].

    ``primary`` and ``secondary`` are timm's (see :func:`official_train_transform`); every random draw they make
    (Python's ``random``, NumPy's and torch's generators) follows the slot's seed, so an image is augmented the same
    way whichever worker decodes it and whether or not the epoch was resumed.
    """

    def __init__(self, primary, secondary):
        self.primary, self.secondary = primary, secondary

    def __call__(self, img, seed: int) -> torch.Tensor:
        return _to_uint8(_seeded(int(seed), lambda: self.secondary(self.primary(img))))


class FinetuneEvalTransform:
    """The PIL part of the official evaluation transform: torchvision's ``Resize(eval_resize_size(S), bicubic)`` and
    ``CenterCrop(S)``; PIL RGB image (and an unused seed) -> uint8 [3, S, S]."""

    def __init__(self, input_size: int):
        from torchvision import transforms

        self.input_size = input_size
        self.resize_crop = transforms.Compose([
            transforms.Resize(eval_resize_size(input_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size)])

    def __call__(self, img, seed: int = 0) -> torch.Tensor:
        return _to_uint8(self.resize_crop(img))


def stream_seeds(seeds, stream: int) -> np.ndarray:
    """int64 [B] in [0, 2**31 - 1): a seed per slot for a further random stream ``stream`` (>= 1) of its augmentation,
    a fixed function of the slot's seed, independent of the draws the slot's own seed gives."""
    seeds = np.asarray(seeds, dtype=np.int64)
    mixed = slot_uniforms(seeds * 7919 + 104729 * stream + 1, 1)[:, 0]
    return (mixed * (2**31 - 1)).astype(np.int64)


class SeededErasing:
    """timm's ``RandomErasing`` (the official transform's last step) on a device batch of normalized images, each
    slot's draws (which boxes, and the noise in them) seeded from its slot seed (:func:`stream_seeds`, stream 2).

    ``erasing`` is the timm object, moved to the batch's device; the global generators are restored after each
    batch, so the training's random state is untouched.
    """

    STREAM = 2

    def __init__(self, erasing):
        self.erasing = erasing

    def __call__(self, images: torch.Tensor, seeds) -> torch.Tensor:
        import copy
        import random

        erasing = self.erasing
        if erasing.device != images.device:
            erasing = copy.copy(erasing)
            erasing.device = images.device
        py_state = random.getstate()
        cpu_state = torch.random.get_rng_state()
        cuda = images.device.type == "cuda"
        if cuda:
            device_index = images.device.index if images.device.index is not None else torch.cuda.current_device()
            cuda_state = torch.cuda.get_rng_state(device_index)
        try:
            for image, seed in zip(images, stream_seeds(seeds, self.STREAM).tolist()):
                random.seed(seed)
                if cuda:
                    torch.cuda.default_generators[device_index].manual_seed(seed)
                else:
                    torch.random.default_generator.manual_seed(seed)
                erasing(image)
        finally:
            random.setstate(py_state)
            torch.random.set_rng_state(cpu_state)
            if cuda:
                torch.cuda.set_rng_state(cuda_state, device_index)
        return images
