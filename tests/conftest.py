"""Test configuration: Triton runs interpreted on CPU-only machines; GPU tests skip with the reason."""

import os

import numpy as np
import pytest
import torch

# Triton reads this when a kernel is decorated, so set it before any test imports mae_fast.kernels.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def _round_like_the_gpu() -> None:
    """Make the interpreter round float32 -> bfloat16 to nearest even, as GPUs do.

    Triton's CPU interpreter truncates this conversion (its _convert_float drops the low bits), so
    an interpreted kernel that writes bfloat16 would be up to one unit in the last place off where
    the compiled kernel is exact. The tests check the kernels' arithmetic, not the emulator's.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
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


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _round_like_the_gpu()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
