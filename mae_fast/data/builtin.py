"""The built-in image set: procedural scenes written as real JPEG files on first use.

With no ``--data_path`` the trainer still runs a real pretraining through the same decode path as
real data. Each image is a scene of gradients, shapes and textures drawn from a seeded generator,
so the set is the same on every machine; it is written once into a cache folder (atomically: a
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

VERSION = 1
DEFAULT_SIZE = 96
DEFAULT_COUNT = 1024


def default_cache_dir() -> Path:
    """``$MAE_FAST_CACHE`` or ``~/.cache/mae_fast``."""
    return Path(os.environ.get("MAE_FAST_CACHE", Path.home() / ".cache" / "mae_fast")).expanduser()


def render_scene(rng: np.random.Generator, size: int):
    """One procedural RGB scene as a PIL image: a gradient sky, a textured ground and a few shapes."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    canvas = c0 * (1 - t) + c1 * t
    # A textured band: stripes or a checkerboard at a random frequency.
    freq = rng.uniform(3, 10)
    if rng.random() < 0.5:
        texture = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
    else:
        texture = np.sign(np.sin(2 * np.pi * freq * xx) * np.sin(2 * np.pi * freq * yy))[..., None]
    band = (yy > rng.uniform(0.5, 0.8))[..., None]
    canvas = np.where(band, canvas * 0.6 + 50 * texture + rng.uniform(0, 255, 3) * 0.4, canvas)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(size * 0.06, size * 0.25)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r], fill=color)
        else:
            pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in rng.uniform(0, 2 * np.pi, 3)]
            draw.polygon(pts, fill=color)
    noise = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def builtin_image_dir(count: int = DEFAULT_COUNT, size: int = DEFAULT_SIZE, cache_dir: str | os.PathLike | None = None,
                      seed: int = 0) -> Path:
    """The folder of the built-in set, written on first use; returns its path.

    Args:
        count: number of images.
        size: side of the square images in pixels.
        cache_dir: where to keep it (default :func:`default_cache_dir`).
        seed: generator seed (a different seed is a different set).
    """
    if count < 1 or size < 8:
        raise ValueError(f"the built-in set needs count >= 1 and size >= 8, got count={count}, size={size}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"builtin-v{VERSION}-n{count}-s{size}-seed{seed}"
    if (target / "DONE").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("writing the built-in image set (%d JPEGs, %dx%d) to %s", count, size, size, target)
    tmp = Path(tempfile.mkdtemp(prefix=".builtin-", dir=root))
    try:
        for i in range(count):
            rng = np.random.default_rng([seed, i])
            render_scene(rng, size).save(tmp / f"scene_{i:05d}.jpg", quality=90)
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
