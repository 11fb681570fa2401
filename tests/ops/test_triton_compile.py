"""Every Triton kernel launch compiles for the GPUs the project targets, on machines without one.

The interpreter the other op tests run on accepts programs the real compiler rejects; this test
compiles each launch the ops make at MAE shapes (all dtypes and modes, the smallest and the
largest autotune configuration) to a cubin for sm_90 (Hopper) and sm_80 (Ampere). See
``triton_aot.py`` beside this file.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

AOT = Path(__file__).with_name("triton_aot.py")


def _kernel_names() -> set[str]:
    from mae_fast.kernels import gather_patches, gather_tokens, index, masked_patch_loss, restore_tokens
    names = set()
    for module in (gather_patches, gather_tokens, index, masked_patch_loss, restore_tokens):
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and not inspect.isclass(obj) and getattr(obj, "fn", None) is not None:
                names.add(name)
    return names


@pytest.mark.skipif("nvidia" not in getattr(triton.backends, "backends", {}),
                    reason="this Triton has no NVIDIA backend to compile with")
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a GPU is here: the other op tests and the benchmarks compile and run the kernels natively")
def test_every_kernel_launch_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(AOT), "--arch", "90", "--arch", "80"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], json.dumps(report["failures"][:3], indent=1)
    expected = _kernel_names()
    assert len(expected) == 9, expected  # a new kernel must show up here, and below
    assert set(report["kernels"]) == expected
    assert report["compiled"] >= 2 * 2 * len(expected)  # two architectures, at least two configurations each
    # The loss rounds its divides and square root as IEEE says (the interpreter's results, and the bf16 gradient's
    # half-step bound): compiled Triton's `/` and tl.sqrt would give div.full.f32 and sqrt.approx.ftz.f32.
    for kernel in ("masked_patch_loss_fwd_kernel", "masked_patch_loss_bwd_kernel"):
        assert set(report["ptx_float_math"][kernel]) == {"div.rn.f32", "sqrt.rn.f32"}, report["ptx_float_math"]
