"""Test configuration: Triton runs interpreted on CPU-only machines; GPU tests skip with the reason."""

import os

import pytest
import torch

# Triton reads this when a kernel is decorated, so set it before any test imports mae_fast.kernels.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    try:
        from mae_fast.kernels._launch import round_interpreted_bf16_like_the_gpu
    except ImportError:  # no Triton here: the kernel tests skip
        pass
    else:
        round_interpreted_bf16_like_the_gpu()


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
