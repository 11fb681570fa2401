"""Small runs for the trainer tests."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: The fused ops a training step runs, with whether its backward runs one of their ops too (uint8 images and the frozen
#: position table take no gradient), and the prefix of their Triton and CUDA kernels' names (add_pos_embed runs
#: gather_tokens' kernels).
STEP_FUSED_OPS = {"gather_patches": (False, "gather_patches_"), "add_pos_embed": (False, "gather_tokens_"),
                  "restore_tokens": (True, "restore_tokens_"), "masked_patch_loss": (True, "masked_patch_loss_")}


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


def profile_fused_ops(fn) -> tuple[Counter, Counter]:
    """Run ``fn()`` under torch.profiler; return ``(ops, kernels)``: how often each ``mae_fast::`` custom op was
    called (``"mae_fast::restore_tokens_triton_backward"``, ...) and each GPU kernel launched, by name (none on a
    CPU, where interpreted Triton launches nothing)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        fn()
    ops, kernels = Counter(), Counter()
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += 1
        elif event.name.startswith("mae_fast::"):
            ops[event.name] += 1
    return ops, kernels


def fused_op_runs(ops: Counter, kernels: Counter) -> dict[str, dict[str, int]]:
    """Per op of :data:`STEP_FUSED_OPS`: calls of its Triton and CUDA ops (forward, backward) and launches of GPU
    kernels named after it, from :func:`profile_fused_ops`."""
    runs = {}
    for op, (_, prefix) in STEP_FUSED_OPS.items():
        runs[op] = {"forward": sum(ops[f"mae_fast::{op}_{b}"] for b in ("triton", "cuda")),
                    "backward": sum(ops[f"mae_fast::{op}_{b}_backward"] for b in ("triton", "cuda")),
                    "gpu_kernels": sum(n for name, n in kernels.items() if prefix in name and "kernel" in name)}
    return runs
