"""Test configuration: Triton runs interpreted on CPU-only machines; GPU tests skip with the reason."""

import os

import pytest
import torch

# Under pytest-xdist (the README's `-n 2`), each worker computes on one thread, and so do the processes its tests start:
# two workers of torch's default thread count on a 2-core machine oversubscribe it, and OpenMP's spinning threads then
# made CPU-heavy tests (bf16 matmuls, compiled code) several times slower than run alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

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
