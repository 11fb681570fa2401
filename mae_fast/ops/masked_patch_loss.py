"""masked_patch_loss: the MAE reconstruction loss on the removed patches.

Per patch l with target t (the official patchify of ``imgs``; with ``norm_pix`` normalized by its
own mean and unbiased variance, ``(t - mean) / sqrt(var + eps)``), the loss is the mean over its
N = p*p*C values of ``(pred - t)**2``; the result is ``sum_l mask_l * loss_l / sum_l mask_l``
over the batch, 0 when no patch is masked.

Byte floor: read the masked patches' pred and pixels, B*L*m*N elements each (m = masked
fraction), and write their pred gradient; visible patches need not be read.
"""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops._validate import check_patch_size, check_same_device, check_tensor
from mae_fast.ops.patchify import patchify


def masked_patch_loss_reference(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                                norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`masked_patch_loss` (no input checks)."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    target = patchify(imgs, patch_size).to(acc)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the official code
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.to(acc) - target) ** 2).mean(dim=-1)
    weights = mask.detach().to(acc)
    total = weights.sum()
    # Divide by 1 instead of 0 when nothing is masked: the numerator is then 0 too.
    return (per_patch * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


IMPLEMENTATIONS = dispatch.register("masked_patch_loss", torch=masked_patch_loss_reference)


def masked_patch_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                      norm_pix: bool = True, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """The official MAE loss, restricted to the masked patches.

    Args:
        pred: [B, L, p*p*C] predictions in the official patch order (row, column, channel).
            float32/float16/bfloat16 (float64 on the torch backend).
        imgs: [B, C, H, W] float images; L = (H/p) * (W/p).
        mask: [B, L] float or bool, 1 = removed (scored), 0 = kept. Treated as a constant: no
            gradient flows to it.
        patch_size: p.
        norm_pix: normalize each target patch by its mean and unbiased variance
            (``--norm_pix_loss``); needs at least 2 values per patch.
        eps: added to the variance.
        backend: "auto", "cuda", "triton" or "torch".

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs); differentiable w.r.t. ``pred`` and
        ``imgs``.

    Raises:
        TypeError / ValueError: bad rank, dtype, device, shapes or patch size.
        BackendUnavailableError: an explicit backend cannot run here.
    """
    check_tensor("pred", pred, ndim=3, float_only=True)
    check_tensor("imgs", imgs, ndim=4, float_only=True)
    check_tensor("mask", mask, ndim=2)
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got {mask.dtype}")
    check_same_device(pred=pred, imgs=imgs, mask=mask)
    gh, gw = check_patch_size(patch_size, imgs)
    B, C = imgs.shape[:2]
    L, N = gh * gw, C * patch_size * patch_size
    if tuple(pred.shape) != (B, L, N):
        raise ValueError(f"pred must have shape [{B}, {L}, {N}] for imgs of shape {tuple(imgs.shape)} "
                         f"and patch_size={patch_size}, got {tuple(pred.shape)}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"mask must have shape [{B}, {L}], got {tuple(mask.shape)}")
    if norm_pix and N < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch, got p*p*C = {N}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    chosen = dispatch.choose("masked_patch_loss", backend, IMPLEMENTATIONS, (pred, imgs))
    return IMPLEMENTATIONS[chosen](pred, imgs, mask, patch_size, bool(norm_pix), float(eps))
