"""The dense bf16 peaks that model FLOP utilization is reported against, by the names the driver gives."""

import pytest

from mae_fast.trainer import peak_flops_for


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("Tesla V100-SXM2-32GB", 125e12),
])
def test_each_variant_has_its_own_peak(name, peak):
    assert peak_flops_for(name) == peak


def test_an_unknown_gpu_reports_no_peak():
    assert peak_flops_for("NVIDIA Some Future GPU") is None
