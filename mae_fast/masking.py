"""MAE random masking: the official ``random_masking`` and the original design's ``get_and_apply_mask``.

Both are built on :func:`mae_fast.ops.sample_mask`, so every path in mae_fast masks the same way:
noise ``U[0, 1)`` per patch, the ``int(L * (1 - mask_ratio))`` patches with the smallest noise
kept in noise-sorted order.
"""

from __future__ import annotations

import torch

from mae_fast.ops import gather_tokens, sample_mask
from mae_fast.ops._validate import check_tensor


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None, backend: str = "auto"):
    """Per-sample random masking of a token sequence (the official signature).

    Args:
        x: [B, L, D] tokens.
        mask_ratio: fraction of tokens to remove, in [0, 1).
        noise: optional [B, L] noise replacing the random draw (reproducible masks).
        backend: kernel backend for the gather (see :mod:`mae_fast.ops`).

    Returns:
        ``x_masked`` [B, K, D] (the kept tokens, noise-sorted), ``mask`` [B, L] float32
        (0 = kept, 1 = removed) and ``ids_restore`` [B, L] int64.
    """
    check_tensor("x", x, ndim=3, float_only=True)
    B, L, _ = x.shape
    ids_keep, ids_restore, mask = sample_mask(B, L, mask_ratio, noise=noise, device=x.device)
    x_masked = gather_tokens(x, ids_keep, None, backend=backend, check_indices=False)
    return x_masked, mask, ids_restore


def get_and_apply_mask(patches: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Mask a batch of patches, the original design's interface.

    Args:
        patches: [B, L, D] patch vectors or tokens.
        mask_ratio: fraction of patches to remove, in [0, 1).
        noise: optional [B, L] noise replacing the random draw.

    Returns:
        ``visible_patches`` [B, K, D] (noise-sorted), ``masked_indices`` [B, L - K] int64 (the
        removed patches' indices, noise-sorted, for the loss) and ``resolve_ids`` [B, L] int64
        (the ``ids_restore`` that unshuffles the sequence).
    """
    check_tensor("patches", patches, ndim=3, float_only=True)
    B, L, _ = patches.shape
    ids_keep, ids_restore, _ = sample_mask(B, L, mask_ratio, noise=noise, device=patches.device)
    visible = gather_tokens(patches, ids_keep, None, check_indices=False)
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    masked_indices = ids_shuffle[:, ids_keep.shape[1]:]
    return visible, masked_indices, ids_restore
