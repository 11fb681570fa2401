"""Helpers shared by the op tests: backends to test, input makers, and the tolerance rule."""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops.shapes import TEST_SHAPES, OpShape

__all__ = ["TEST_SHAPES", "OpShape", "kernel_backends", "device_for", "assert_close_to_reference",
           "make_ids_keep", "noncontiguous", "DTYPES"]

DTYPES = (torch.float32, torch.bfloat16)


def kernel_backends(implementations) -> list[str]:
    """Non-reference backends of an op that can run on this machine (CUDA, or Triton interpreted)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = [torch.zeros(1, device=device)]
    return [b for b in implementations if b != "torch" and dispatch._why_not(b, probe) is None]


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu")


def make_ids_keep(shape: OpShape, device, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (ids_keep, ids_restore, mask) for ``shape``, as the model would draw them."""
    from mae_fast.ops import sample_mask
    return sample_mask(batch or shape.batch, shape.num_patches, shape.mask_ratio, device=device)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with a non-contiguous layout (every other element of a twice-as-wide buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    out.requires_grad_(t.requires_grad)
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out


def assert_close_to_reference(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, floor: float = 1e-6,
                              name: str = "output") -> None:
    """STYLE.md's rule: ``max|out - ref_hi| <= 2 * max|ref_lo - ref_hi| + floor``.

    ``ref_hi`` is the reference in float64, ``ref_lo`` the reference run in the test dtype.
    """
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_lo.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    bound = 2 * ref_err + floor
    assert err <= bound, f"{name}: max error {err:.3g} exceeds 2 * {ref_err:.3g} + {floor:g}"
