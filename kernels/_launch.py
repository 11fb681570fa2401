"""Launch helpers shared by the kernel modules: tiles from a fixed rule, on the tensors' own device.

Launch parameters come from the shapes by :func:`row_tile` (the way Liger-Kernel's
``calculate_settings`` does it), in the interpreter and on GPUs alike, so a run is repeatable bit
for bit and the first step does not stall while configurations are timed. Autotuning over
:func:`row_tile_configs` is an opt-in for the benchmarks: ``MAE_FAST_TRITON_AUTOTUNE=1``.

Every launch runs under the device of its first tensor argument (Triton launches on the current
device otherwise, so tensors on ``cuda:1`` with device 0 current would be read from the wrong GPU).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

#: Elements per program the fixed rule aims at: enough work per program to hide latency, small
#: enough that a ViT-B batch gives many waves of programs.
TILE_ELEMENTS = 4096
MAX_ROWS = 16


def interpreted() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    """True when launches should autotune (``MAE_FAST_TRITON_AUTOTUNE=1``, GPUs only; for benchmarks)."""
    return os.environ.get("MAE_FAST_TRITON_AUTOTUNE", "0") not in ("", "0") and not interpreted()


def row_tile(width: int) -> tuple[int, int]:
    """``(ROWS, num_warps)`` for a program that handles ``ROWS`` rows of ``width`` (a power of two) columns.

    The fixed rule: about :data:`TILE_ELEMENTS` elements per program (1 to :data:`MAX_ROWS` rows),
    4 warps up to 2048 elements and 8 above. ViT-B/16: patch rows of 768 values (tile 1024) run
    4 rows with 8 warps, token rows of 768 channels the same, decoder rows of 512 run 8 rows.
    """
    rows = max(1, min(MAX_ROWS, TILE_ELEMENTS // max(int(width), 1)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two
    return rows, (4 if rows * width <= 2048 else 8)


def row_tile_configs(warps=(4, 8)) -> list[triton.Config]:
    """Autotune space for row-tiled kernels (benchmarks only): rows per program x warps."""
    return [triton.Config({"ROWS": rows}, num_warps=w) for rows in (1, 2, 4, 8) for w in warps]


def _first_device(args) -> torch.device | None:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


def on_device(device: torch.device | None):
    """A context that makes ``device`` current for a launch when it is a CUDA device; a no-op otherwise."""
    if device is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch(kernel, tuned, grid, *args, tile_width: int, **kwargs) -> None:
    """Launch the row-tiled ``kernel`` with ``ROWS``/``num_warps`` from :func:`row_tile` (``tile_width`` columns).

    ``grid`` is a function of the launch meta-parameters (``meta["ROWS"]``). With
    :func:`autotuning` on, ``tuned`` (the autotuned version of ``kernel``) picks them instead.
    """
    with on_device(_first_device(args)):
        if tuned is not None and autotuning():
            tuned[grid](*args, **kwargs)
            return
        rows, warps = row_tile(tile_width)
        kernel[grid](*args, ROWS=rows, num_warps=warps, **kwargs)


def launch_fixed(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel`` on ``grid`` (a tuple) with the given meta-parameters, under its tensors' device."""
    with on_device(_first_device(args)):
        kernel[grid](*args, **kwargs)


def round_interpreted_bf16_like_the_gpu() -> None:
    """Make the Triton interpreter round float32 -> bfloat16 to nearest even, as GPUs do (idempotent).

    The interpreter truncates this conversion (its ``_convert_float`` drops the low bits), so an
    interpreted kernel that writes bfloat16 would be up to one unit in the last place off where the
    compiled kernel is exact. The test suite and ``python -m mae_fast.info --check --interpret``
    check the kernels' arithmetic, not the emulator's, so both install this.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_mae_fast_rne", False):
        return

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
            return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)
        return original(data, input_dtype, output_dtype, rounding_mode)

    convert._mae_fast_rne = True
    interpreter._convert_float = convert


def block(n: int) -> int:
    """The power-of-two tile width covering ``n`` elements (at least 16)."""
    return max(16, triton.next_power_of_2(n))


def d_block(D: int) -> int:
    """Tile width along the channel dimension of token rows: a power of two, 16 to 1024."""
    return min(block(D), 1024)
