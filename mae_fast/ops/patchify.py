"""Patchify and unpatchify in the official MAE layout.

A patch vector lists its pixels row by row, column by column, with the channel fastest:
``patch[(i * p + j) * C + c] = img[c, h * p + i, w * p + j]`` (the official ``nchpwq->nhwpqc``).
Patches are numbered row-major over the patch grid: ``l = h * grid_w + w``.
"""

from __future__ import annotations

import math

import torch

from mae_fast.ops._validate import check_patch_size, check_tensor


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into flattened patches, official MAE order.

    Args:
        imgs: [B, C, H, W], any dtype; H and W divisible by ``patch_size``.
        patch_size: p.

    Returns:
        [B, L, p*p*C] with L = (H/p) * (W/p), same dtype and device as ``imgs``.

    Raises:
        ValueError: ``imgs`` is not 4-D, or ``patch_size`` does not divide H and W.
    """
    check_tensor("imgs", imgs, ndim=4)
    gh, gw = check_patch_size(patch_size, imgs)
    B, C = imgs.shape[:2]
    p = patch_size
    x = imgs.reshape(B, C, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, gh * gw, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        x: [B, L, p*p*C].
        patch_size: p.
        grid: the patch grid (h, w) with h * w = L; None means a square grid.

    Returns:
        [B, C, h*p, w*p], same dtype and device as ``x``.

    Raises:
        ValueError: ``x`` is not 3-D, its last dimension is not a multiple of p*p, or ``grid``
            does not match L (or L is not a square when ``grid`` is None).
    """
    check_tensor("x", x, ndim=3)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    B, L, D = x.shape
    p = patch_size
    if D % (p * p):
        raise ValueError(f"x's last dimension {D} is not a multiple of patch_size**2 = {p * p}")
    C = D // (p * p)
    if grid is None:
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"x has {L} patches, which is not a square grid; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    if gh * gw != L:
        raise ValueError(f"grid={tuple(grid)} holds {gh * gw} patches but x has {L}")
    x = x.reshape(B, gh, gw, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, C, gh * p, gw * p)
