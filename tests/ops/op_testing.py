"""Helpers shared by the op tests: backends to test, poisoned allocations, and the tolerance rule."""

from __future__ import annotations

import contextlib
from functools import partial

import pytest
import torch

from mae_fast.ops import IMPLEMENTATIONS, dispatch
from mae_fast.ops.shapes import TEST_SHAPES, OpShape

__all__ = ["TEST_SHAPES", "OpShape", "SHAPE_IDS", "DTYPES", "kernel_backends", "device", "noncontiguous",
           "assert_close_to_reference", "check_backend", "poisoned_allocations", "normalized_by_definition"]

SHAPE_IDS = [s.name for s in TEST_SHAPES]
DTYPES = (torch.float32, torch.bfloat16)


def device() -> torch.device:
    """Where the backend tests run: the GPU when there is one, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_backends(op: str) -> list:
    """pytest params for the op's non-reference backends; those that cannot run here skip with the reason."""
    params = []
    probe = [torch.zeros(1, device=device())]
    for backend in ("triton", "cuda"):
        if backend not in IMPLEMENTATIONS[op]:
            reason = f"{op} has no {backend} backend"
        else:
            reason = dispatch._why_not(backend, probe)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


@contextlib.contextmanager
def poisoned_allocations():
    """New tensors from torch.empty are filled with NaN (ints: their max), so an unwritten output shows."""
    old_mode = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with a non-contiguous layout (every other element of a twice-as-wide buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def normalized_by_definition(pixels: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """``(pixel - mean[c]) / std[c]`` of uint8 ``pixels`` in ``dtype`` on the CPU, written out here rather than with
    :func:`mae_fast.ops.normalize_images` (which the torch backends' uint8 path uses)."""
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)
    return (pixels.cpu().to(dtype) - m) / s


def assert_close_to_reference(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, floor: float = 1e-6,
                              name: str = "output") -> None:
    """STYLE.md's rule: ``max|out - ref_hi| <= 2 * max|ref_lo - ref_hi| + floor``.

    ``ref_hi`` is the reference in float64 on the same input values, ``ref_lo`` the reference
    run in the test dtype.
    """
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element left unwritten?)"
    if out.numel() == 0:
        return
    err = (out.double() - ref_hi.double()).abs().max().item()
    ref_err = (ref_lo.double() - ref_hi.double()).abs().max().item()
    assert err <= 2 * ref_err + floor, f"{name}: max error {err:.3g} exceeds 2 * {ref_err:.3g} + {floor:g}"


def _run(fn, args: dict, diff: list[str], upstream: torch.Tensor | None):
    out = fn(**args)
    if not diff:
        return out, []
    grads = torch.autograd.grad(out, [args[n] for n in diff], grad_outputs=upstream.to(out.dtype))
    return out, list(grads)


def check_backend(op, backend: str, args: dict, diff: list[str], dtype: torch.dtype, layout: str = "contiguous",
                  keep_dtype: tuple[str, ...] = (), floor: float = 1e-6, **static):
    """Run ``op(backend=backend)`` and check its output and gradients against the torch reference.

    Args:
        op: the public op function.
        args: keyword tensors (float ones are cast to ``dtype`` unless named in ``keep_dtype``).
        diff: names of the float inputs to differentiate.
        layout: "contiguous" or "noncontiguous" (float inputs given to the backend become strided views).
        static: non-tensor keyword arguments.

    Returns the backend's output and gradients (for determinism checks).
    """
    dev = device()

    def make(name, value, strided):
        if not isinstance(value, torch.Tensor):
            return value
        if not value.is_floating_point():
            return value.to(dev)
        value = value.to(dev, dtype if name not in keep_dtype else value.dtype)
        if strided and value.dim() > 1:
            wide = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype, device=dev)
            wide[..., ::2] = value
            return wide.requires_grad_(name in diff)[..., ::2]  # a strided view; autograd.grad works on it
        return value.clone().requires_grad_(name in diff)

    low = {n: make(n, v, layout == "noncontiguous") for n, v in args.items()}
    ref_low = {n: make(n, v, False) for n, v in args.items()}
    high = {n: (v.detach().double().requires_grad_(n in diff) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for n, v in ref_low.items()}
    ref_hi = op(**high, backend="torch", **static)
    upstream = torch.randn_like(ref_hi) if diff else None

    out, grads = _run(partial(op, backend=backend, **static), low, diff, upstream)
    ref_lo, grads_lo = _run(partial(op, backend="torch", **static), ref_low, diff, upstream)
    ref_hi, grads_hi = _run(partial(op, backend="torch", **static), high, diff, upstream)
    assert out.dtype == ref_lo.dtype, f"output dtype {out.dtype} != reference {ref_lo.dtype}"
    assert_close_to_reference(out, ref_hi, ref_lo, floor, "output")
    for name, g, g_lo, g_hi in zip(diff, grads, grads_lo, grads_hi):
        assert g.dtype == g_lo.dtype, f"grad of {name}: dtype {g.dtype} != reference {g_lo.dtype}"
        assert_close_to_reference(g, g_hi, g_lo, floor, f"grad of {name}")
    return out, grads
