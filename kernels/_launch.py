"""Launch helpers shared by the kernel modules: autotuning on GPUs, fixed tiles in the interpreter."""

from __future__ import annotations

import os

import triton


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def row_tile_configs(warps=(4, 8)) -> list[triton.Config]:
    """Autotune space for row-tiled kernels: rows per program x warps (small, so tuning is quick)."""
    return [triton.Config({"ROWS": rows}, num_warps=w) for rows in (1, 2, 4, 8) for w in warps]


def launch(kernel, tuned, grid, *args, interpreter_rows: int = 8, **kwargs) -> None:
    """Run ``tuned`` (the autotuned kernel) on GPUs, or ``kernel`` with a fixed large tile in the interpreter.

    Large tiles keep the interpreter fast: it runs programs one after another in Python.
    """
    if interpreted():
        kernel[grid](*args, ROWS=interpreter_rows, **kwargs)
    else:
        tuned[grid](*args, **kwargs)


def block(n: int) -> int:
    """The power-of-two tile width covering ``n`` elements (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def d_block(D: int) -> int:
    """Tile width along the channel dimension of token rows: a power of two, 16 to 1024."""
    return min(block(D), 1024)
