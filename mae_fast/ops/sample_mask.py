"""Random masking indices, exactly as the official MAE ``random_masking`` makes them."""

from __future__ import annotations

import torch

from mae_fast.ops._validate import check_tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches: ``int(L * (1 - mask_ratio))``, truncated as in the official code."""
    return int(num_patches * (1 - mask_ratio))


def check_mask_ratio(mask_ratio) -> float:
    """Validate a mask ratio (a number in [0, 1)) and return it as float."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


def sample_mask(batch_size: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None = None,
                device: torch.device | str | None = None, generator: torch.Generator | None = None):
    """Draw the per-sample random masks of MAE.

    Noise ``U[0, 1)`` of shape [B, L] is sorted ascending; the K = ``int(L * (1 - mask_ratio))``
    patches with the smallest noise are kept, in that noise-sorted order.

    Args:
        batch_size: B >= 1.
        num_patches: L >= 1.
        mask_ratio: fraction of patches to remove, in [0, 1).
        noise: optional [B, L] float tensor replacing the random draw, which makes the mask
            reproducible across implementations. Its device wins over ``device``.
        device: where to create the tensors when ``noise`` is None (default: CPU).
        generator: optional ``torch.Generator`` for the random draw.

    Returns:
        ``ids_keep`` [B, K] int64: indices of the kept patches, noise-sorted;
        ``ids_restore`` [B, L] int64: position of each original patch in the shuffled order
        (``ids_restore[b, l] < K`` means patch l is kept);
        ``mask`` [B, L] float32: 0 = kept, 1 = removed, in the original patch order.

    Raises:
        ValueError / TypeError: bad sizes, mask ratio, or noise shape/dtype.
    """
    for name, value in (("batch_size", batch_size), ("num_patches", num_patches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    mask_ratio = check_mask_ratio(mask_ratio)
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    else:
        check_tensor("noise", noise, ndim=2, float_only=True)
        if tuple(noise.shape) != (batch_size, num_patches):
            raise ValueError(f"noise must have shape [{batch_size}, {num_patches}] (batch_size, num_patches), "
                             f"got {tuple(noise.shape)}")
    keep = num_kept(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    # The official code scatters [0]*K + [1]*(L-K) back through ids_restore; that equals this.
    mask = (ids_restore >= keep).to(torch.float32)
    return ids_keep, ids_restore, mask
