"""The built-in image set: procedural scenes in classes, written as real JPEG files on first use.

With no ``--data_path`` the trainer still runs a real pretraining through the same decode path as
real data. Each image is a scene of one of :data:`CLASSES` (the direction in which its background
brightens, in a random hue, under a few random shapes), drawn from a seeded generator, so the set
is the same on every machine. It is laid out as ImageNet is: ``train/<class>/*.jpg`` and a held-out
``val/<class>/*.jpg``, so the kNN monitor can tell whether the encoder separates the classes: the
hue and the shapes say nothing about the class, the layout of the brightness does, and
reconstructing masked patches needs it. It is written once into a cache folder (atomically: a
temporary folder renamed into place), then reused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("mae_fast")

VERSION = 3
DEFAULT_SIZE = 96
DEFAULT_COUNT = 1024
#: The classes: the direction in which the scene's background brightens, in steps of 45 degrees.
CLASSES = ("east", "southeast", "south", "southwest", "west", "northwest", "north", "northeast")
#: Held-out images per class in ``val/``, for every ``count``: a quarter of the training images, at least one.
VAL_FRACTION = 0.25


def default_cache_dir() -> Path:
    """``$MAE_FAST_CACHE`` or ``~/.cache/mae_fast``."""
    return Path(os.environ.get("MAE_FAST_CACHE", Path.home() / ".cache" / "mae_fast")).expanduser()


def render_scene(rng: np.random.Generator, size: int, kind: str = "east"):
    """One procedural RGB scene of class ``kind`` as a PIL image: a background that brightens towards the class's
    direction (random hue, +-15 degrees), under a few random shapes and a little noise."""
    from PIL import Image, ImageDraw

    if kind not in CLASSES:
        raise ValueError(f"kind must be one of {', '.join(CLASSES)}, got {kind!r}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    angle = np.deg2rad(45.0 * CLASSES.index(kind) + rng.uniform(-15, 15))
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
    hue = rng.uniform(0.3, 1.0, 3)
    canvas = (rng.uniform(0, 40) + rng.uniform(170, 230) * t) * hue
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(size * 0.05, size * 0.15)
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    noise = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def builtin_image_dir(count: int = DEFAULT_COUNT, size: int = DEFAULT_SIZE, cache_dir: str | os.PathLike | None = None,
                      seed: int = 0) -> Path:
    """The folder of the built-in set (``train/<class>/`` and ``val/<class>/``), written on first use.

    Args:
        count: training images, spread evenly over the classes (``val/`` holds a quarter as many more).
        size: side of the square images in pixels.
        cache_dir: where to keep it (default :func:`default_cache_dir`).
        seed: generator seed (a different seed is a different set).

    Raises:
        ValueError: fewer images than classes, or images under 8 px.
    """
    if count < len(CLASSES) or size < 8:
        raise ValueError(f"the built-in set needs count >= {len(CLASSES)} (one image per class) and size >= 8, got "
                         f"count={count}, size={size}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"builtin-v{VERSION}-n{count}-s{size}-seed{seed}"
    if (target / "DONE").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    per_class = count // len(CLASSES)
    val_per_class = max(1, round(per_class * VAL_FRACTION))
    logger.info("writing the built-in image set (%d classes, %d training and %d validation JPEGs, %dx%d) to %s",
                len(CLASSES), per_class * len(CLASSES), val_per_class * len(CLASSES), size, size, target)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=root))
    try:
        for label, kind in enumerate(CLASSES):
            for split, first, number in (("train", 0, per_class), ("val", per_class, val_per_class)):
                folder = tmp / split / kind
                folder.mkdir(parents=True)
                for i in range(first, first + number):
                    rng = np.random.default_rng([seed, label, i])
                    render_scene(rng, size, kind).save(folder / f"{kind}_{i:05d}.jpg", quality=90)
        (tmp / "DONE").write_text(f"{count}\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "DONE").exists():  # another process finished first otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
