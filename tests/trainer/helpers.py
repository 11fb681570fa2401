"""Small runs for the trainer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, count: int = 16, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB").save(folder / f"{i:03d}.jpg")
    return folder


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Flags for a run that takes a second: tiny model at 32 px (4 patches), torch loader, no workers, on the CPU
    (bitwise-repeatable arithmetic; a later ``--device cuda`` in ``extra`` overrides it)."""
    return ["--data_path", str(data), "--output_dir", str(out), "--model", "mae_vit_tiny_patch16", "--device", "cpu",
            "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
            "--data_backend", "torch", "--num_workers", "0", "--log_every", "1", "--blr", "1e-2", *extra]


def colored_classes(root: Path, per_class: int = 6, classes=("red", "green", "blue")) -> Path:
    """``train/<class>/`` and ``val/<class>/`` (half as many) of solid images whose class is their color: any
    encoder's features separate them."""
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "gray": (120, 120, 120)}
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shade = tuple(max(0, min(255, c + 8 * i - 20)) for c in colors[name])
                Image.new("RGB", (40, 40), shade).save(folder / f"{i}.jpg")
    return root
