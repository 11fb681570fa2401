"""Benchmark environment: device, environment record, copy bandwidth, correct CUDA timing.

On a GPU the benchmarks run the real MAE shapes (``MAE_SHAPES``); on a CPU-only machine they run
small shapes and skip GPU-only providers with the reason, so ``pytest bench/ --benchmark-disable``
is a smoke run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
REPO = Path(__file__).resolve().parents[1]


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def environment() -> dict:
    """Device, software versions and the git revision, recorded in every result's extra_info."""
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or "unknown"
    except Exception:
        revision = "unknown"
    return {"device": torch.cuda.get_device_name() if ON_GPU else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda or "none",
            "git_revision": revision}


_COPY_BANDWIDTH: dict[str, float] = {}


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted), once per session."""
    if "value" not in _COPY_BANDWIDTH:
        n = (1 << 28) if ON_GPU else (1 << 24)  # 1 GiB of float32 on a GPU, 64 MiB on a CPU
        src = torch.empty(n, dtype=torch.float32, device=DEVICE).fill_(1.0)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        sync()
        best = float("inf")
        for _ in range(10):
            start = time.perf_counter()
            dst.copy_(src)
            sync()
            best = min(best, time.perf_counter() - start)
        _COPY_BANDWIDTH["value"] = 2 * src.numel() * 4 / best
        del src, dst
    return _COPY_BANDWIDTH["value"]


def median_seconds(benchmark) -> float | None:
    """The measured median, or None when benchmarking is disabled (smoke runs)."""
    stats = getattr(benchmark, "stats", None)
    if not stats:
        return None
    return stats.stats.median



if not ON_GPU and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # imports work; Triton providers still skip on CPUs
