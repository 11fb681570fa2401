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


#: The CUDA kernel stages a patch in shared memory: at most this many values (p*p*C) per patch.
CUDA_MAX_PATCH_VALUES = 5120


def _fake(pred, imgs, mask, patch_size, norm_pix, eps, grad_pred, grad_imgs):
    loss = pred.new_empty((), dtype=torch.float32)
    saved = pred.new_empty(pred.shape if grad_pred else (0,), dtype=torch.float32)
    gimgs = imgs.new_empty(imgs.shape if grad_imgs else (0,), dtype=torch.float32)
    return loss, saved, gimgs


def _fake_backward(saved_grad_pred, mask, grad_loss, pred_dtype):
    return torch.empty_like(saved_grad_pred, dtype=pred_dtype)


def _register_autograd(op, backward_op):
    """Autograd for a kernel backend's fused ``op`` whose backward is ``backward_op`` (Triton and CUDA alike)."""

    def setup_context(ctx, inputs, output):
        pred, imgs, mask, _, _, _, grad_pred, grad_imgs = inputs
        _, saved, gimgs = output
        ctx.save_for_backward(saved, gimgs, mask)
        ctx.pred_dtype, ctx.imgs_dtype = pred.dtype, imgs.dtype
        ctx.has_grad_pred, ctx.has_grad_imgs = grad_pred, grad_imgs

    def backward(ctx, grad_loss, _grad_saved, _grad_gimgs):
        saved, gimgs, mask = ctx.saved_tensors
        grad_pred = backward_op(saved, mask, grad_loss, ctx.pred_dtype) if ctx.has_grad_pred else None
        grad_imgs = (gimgs * grad_loss).to(ctx.imgs_dtype) if ctx.has_grad_imgs else None
        return grad_pred, grad_imgs, None, None, None, None, None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _fused(op):
    """The public-facing implementation around a fused op: gradients computed in the forward when needed."""

    def run(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6):
        grad_on = torch.is_grad_enabled()
        loss, _, _ = op(pred, imgs, mask.to(torch.float32), patch_size, norm_pix, eps,
                        grad_on and pred.requires_grad, grad_on and imgs.requires_grad)
        return loss

    return run


# Triton: kernels in kernels/masked_patch_loss.py.
@torch.library.custom_op("mae_fast::masked_patch_loss_triton", mutates_args=())
def _masked_patch_loss_triton_fused(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                                    norm_pix: bool, eps: float, grad_pred: bool,
                                    grad_imgs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mae_fast.kernels.masked_patch_loss import masked_patch_loss_forward
    return masked_patch_loss_forward(pred, imgs, mask, patch_size, norm_pix, eps, grad_pred, grad_imgs)


@torch.library.custom_op("mae_fast::masked_patch_loss_triton_backward", mutates_args=())
def _masked_patch_loss_triton_backward(saved_grad_pred: torch.Tensor, mask: torch.Tensor, grad_loss: torch.Tensor,
                                       pred_dtype: torch.dtype) -> torch.Tensor:
    from mae_fast.kernels.masked_patch_loss import masked_patch_loss_backward
    return masked_patch_loss_backward(saved_grad_pred, mask, grad_loss, pred_dtype)


_masked_patch_loss_triton_fused.register_fake(_fake)
_masked_patch_loss_triton_backward.register_fake(_fake_backward)
_register_autograd(_masked_patch_loss_triton_fused, _masked_patch_loss_triton_backward)


# CUDA: schemas and kernels in csrc/ (mae_fast._C); fake and autograd registered once it loads.
def _register_cuda():
    torch.library.register_fake("mae_fast::masked_patch_loss_cuda", _fake)
    torch.library.register_fake("mae_fast::masked_patch_loss_cuda_backward", _fake_backward)
    _register_autograd("mae_fast::masked_patch_loss_cuda", torch.ops.mae_fast.masked_patch_loss_cuda_backward)


def _masked_patch_loss_cuda_fused(*args):
    return torch.ops.mae_fast.masked_patch_loss_cuda(*args)


dispatch.on_cuda_extension_load(_register_cuda)
IMPLEMENTATIONS = dispatch.register("masked_patch_loss", torch=masked_patch_loss_reference,
                                    triton=_fused(_masked_patch_loss_triton_fused),
                                    cuda=_fused(_masked_patch_loss_cuda_fused))


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
    unfit = {"cuda": f"its kernel handles at most {CUDA_MAX_PATCH_VALUES} values per patch, got {N}"} \
        if N > CUDA_MAX_PATCH_VALUES else None
    chosen = dispatch.choose("masked_patch_loss", backend, IMPLEMENTATIONS, (pred, imgs), unfit)
    return IMPLEMENTATIONS[chosen](pred, imgs, mask, patch_size, bool(norm_pix), float(eps))
