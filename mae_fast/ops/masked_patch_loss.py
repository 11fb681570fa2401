"""masked_patch_loss: the MAE reconstruction loss on the removed patches.

Per patch l with target t (the official patchify of ``imgs``; with ``norm_pix`` normalized by its
own mean and unbiased variance, ``(t - mean) / sqrt(var + eps)``), the loss is the mean over its
N = p*p*C values of ``(pred - t)**2``; the result is ``sum_l mask_l * loss_l / sum_l mask_l``
over the batch, 0 when no patch is masked.

Byte floor: read the masked patches' pred and pixels, B*L*m*N elements each (m = masked
fraction), and write the pred gradient; visible patches need not be read. :func:`bytes_moved`
gives what the kernel backends move.
"""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops._validate import check_patch_size, check_same_device, check_tensor
from mae_fast.ops.normalize import image_stats, normalize_images
from mae_fast.ops.patchify import patchify


def masked_patch_loss_reference(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                                norm_pix: bool = True, eps: float = 1e-6, pred_offset: int = 0, mean=None,
                                std=None) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`masked_patch_loss` (no input checks beyond ``mean``/``std``)."""
    if imgs.dtype == torch.uint8:
        imgs = normalize_images(imgs, mean, std)
    elif mean is not None or std is not None:
        image_stats(imgs, mean, std)  # raises: statistics are for uint8 images
    pred = pred[:, pred_offset:]
    acc = torch.promote_types(pred.dtype, torch.float32)
    target = patchify(imgs, patch_size).to(acc)
    if norm_pix:
        mean_t = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the official code
        target = (target - mean_t) / (var + eps) ** 0.5
    per_patch = ((pred.to(acc) - target) ** 2).mean(dim=-1)
    weights = mask.detach().to(acc)
    total = weights.sum()
    # Divide by 1 instead of 0 when nothing is masked: the numerator is then 0 too.
    return (per_patch * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


#: The CUDA kernels keep a patch in registers (p = 14, 16 with 3 channels) or loop over it in
#: global memory (any other size, up to this many values p*p*C).
CUDA_MAX_PATCH_VALUES = 1 << 16


def bytes_moved(batch: int, num_patches: int, patch_dim: int, num_masked: int, pred_dtype: torch.dtype,
                imgs_dtype: torch.dtype, pred_offset: int = 0) -> dict[str, int]:
    """Bytes the kernel backends move per call, by pass (``forward``, ``backward``), and the ``floor``.

    Forward reads the masked patches' predictions and pixels, the mask, and writes one float per
    patch; backward reads the masked patches again and writes the whole prediction gradient
    (visible and leading rows as zeros, without reads). ``floor`` is the least any implementation
    moves: one read of the masked patches and one write of the gradient.
    """
    e_pred, e_img = pred_dtype.itemsize, imgs_dtype.itemsize
    masked = batch * num_masked * patch_dim * (e_pred + e_img)
    rows = batch * num_patches
    forward = masked + rows * 4 * 2  # mask in, per-patch loss out
    backward = masked + batch * (num_patches + pred_offset) * patch_dim * e_pred + rows * 4
    floor = masked + batch * (num_patches + pred_offset) * patch_dim * e_pred
    return {"forward": forward, "backward": backward, "floor": floor}


def _fake(pred, imgs, norm, mask, patch_size, pred_offset, norm_pix, eps):
    return pred.new_empty((), dtype=torch.float32)


def _fake_backward(pred, imgs, norm, mask, grad_loss, patch_size, pred_offset, norm_pix, eps, grad_pred, grad_imgs):
    return (pred.new_empty(pred.shape if grad_pred else (0,)),
            imgs.new_empty(imgs.shape if grad_imgs else (0,)))


def _register_autograd(op, backward_op):
    """Autograd for a kernel backend's ``op`` whose backward recomputes with ``backward_op`` (Triton and CUDA)."""

    def setup_context(ctx, inputs, output):
        pred, imgs, norm, mask, patch_size, pred_offset, norm_pix, eps = inputs
        ctx.save_for_backward(pred, imgs, norm, mask)
        ctx.settings = (patch_size, pred_offset, norm_pix, eps)

    def backward(ctx, grad_loss):
        pred, imgs, norm, mask = ctx.saved_tensors
        want_pred, want_imgs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_pred or want_imgs):
            return None, None, None, None, None, None, None, None
        grad_pred, grad_imgs = backward_op(pred, imgs, norm, mask, grad_loss, *ctx.settings, want_pred, want_imgs)
        return (grad_pred if want_pred else None), (grad_imgs if want_imgs else None), None, None, None, None, None, \
            None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


# Triton: kernels in kernels/masked_patch_loss.py.
@torch.library.custom_op("mae_fast::masked_patch_loss_triton", mutates_args=())
def _masked_patch_loss_triton(pred: torch.Tensor, imgs: torch.Tensor, norm: torch.Tensor | None, mask: torch.Tensor,
                              patch_size: int, pred_offset: int, norm_pix: bool, eps: float) -> torch.Tensor:
    from mae_fast.kernels.masked_patch_loss import masked_patch_loss_forward
    return masked_patch_loss_forward(pred, imgs, norm, mask, patch_size, pred_offset, norm_pix, eps)


@torch.library.custom_op("mae_fast::masked_patch_loss_triton_backward", mutates_args=())
def _masked_patch_loss_triton_backward(pred: torch.Tensor, imgs: torch.Tensor, norm: torch.Tensor | None,
                                       mask: torch.Tensor, grad_loss: torch.Tensor, patch_size: int, pred_offset: int,
                                       norm_pix: bool, eps: float, grad_pred: bool,
                                       grad_imgs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from mae_fast.kernels.masked_patch_loss import masked_patch_loss_backward
    return masked_patch_loss_backward(pred, imgs, norm, mask, grad_loss, patch_size, pred_offset, norm_pix, eps,
                                      grad_pred, grad_imgs)


_masked_patch_loss_triton.register_fake(_fake)
_masked_patch_loss_triton_backward.register_fake(_fake_backward)
_register_autograd(_masked_patch_loss_triton, _masked_patch_loss_triton_backward)


# CUDA: kernels in csrc/masked_patch_loss.cu (mae_fast._C); schema, fake and autograd defined here at import.
dispatch.define_cuda_op(
    "masked_patch_loss_cuda(Tensor pred, Tensor imgs, Tensor? norm, Tensor mask, int patch_size, int pred_offset, "
    "bool norm_pix, float eps) -> Tensor", _fake)
dispatch.define_cuda_op(
    "masked_patch_loss_cuda_backward(Tensor pred, Tensor imgs, Tensor? norm, Tensor mask, Tensor grad_loss, "
    "int patch_size, int pred_offset, bool norm_pix, float eps, bool grad_pred, bool grad_imgs) -> (Tensor, Tensor)",
    _fake_backward)
_register_autograd("mae_fast::masked_patch_loss_cuda", torch.ops.mae_fast.masked_patch_loss_cuda_backward)


def _fused(op):
    """The public-facing implementation around a fused op: the mask as float32, uint8 statistics as [2, C]."""

    def run(pred, imgs, mask, patch_size, norm_pix=True, eps=1e-6, pred_offset=0, mean=None, std=None):
        return op(pred, imgs, image_stats(imgs, mean, std), mask.to(torch.float32), patch_size, pred_offset,
                  norm_pix, eps)

    return run


IMPLEMENTATIONS = dispatch.register("masked_patch_loss", torch=masked_patch_loss_reference,
                                    triton=_fused(_masked_patch_loss_triton),
                                    cuda=_fused(torch.ops.mae_fast.masked_patch_loss_cuda))


def masked_patch_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                      norm_pix: bool = True, eps: float = 1e-6, backend: str = "auto", *, pred_offset: int = 0,
                      mean=None, std=None) -> torch.Tensor:
    """The official MAE loss, restricted to the masked patches.

    Args:
        pred: [B, pred_offset + L, p*p*C] predictions in the official patch order (row, column,
            channel). float32/float16/bfloat16 (float64 on the torch backend); any strides.
        imgs: [B, C, H, W] float images, or uint8 images with ``mean`` and ``std`` (normalized on
            the fly, bit for bit as :func:`mae_fast.ops.normalize.normalize_images` then this op);
            any strides (an NHWC batch as ``permute(0, 3, 1, 2)``). L = (H/p) * (W/p).
        mask: [B, L] float or bool, 1 = removed (scored), 0 = kept. Treated as a constant: no
            gradient flows to it.
        patch_size: p.
        norm_pix: normalize each target patch by its mean and unbiased variance
            (``--norm_pix_loss``); needs at least 2 values per patch.
        eps: added to the variance.
        backend: "auto", "cuda", "triton" or "torch".
        pred_offset: leading tokens of ``pred`` that are not patches (1 for the decoder output
            with its cls token): they are not scored and get a zero gradient, so the whole decoder
            output can be passed without a slice (whose backward would zero-fill and copy it).
        mean, std: C values each (0-255 scale) for uint8 ``imgs``; not allowed for float images.

    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs); differentiable w.r.t. ``pred`` and
        float ``imgs``.

    Raises:
        TypeError / ValueError: bad rank, dtype, device, shapes, patch size, offset or statistics.
        BackendUnavailableError: an explicit backend cannot run here (Triton: patches of more than 4,096
            values, see ``dispatch.TRITON_MAX_TILE``; CUDA: more than 65,536; auto passes over them then).
    """
    check_tensor("pred", pred, ndim=3, float_only=True)
    check_tensor("imgs", imgs, ndim=4, float_only=imgs.dtype != torch.uint8 if isinstance(imgs, torch.Tensor) else True)
    check_tensor("mask", mask, ndim=2)
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got {mask.dtype}")
    check_same_device(pred=pred, imgs=imgs, mask=mask)
    gh, gw = check_patch_size(patch_size, imgs)
    if isinstance(pred_offset, bool) or not isinstance(pred_offset, int) or pred_offset < 0:
        raise ValueError(f"pred_offset must be an int >= 0, got {pred_offset!r}")
    B, C = imgs.shape[:2]
    L, N = gh * gw, C * patch_size * patch_size
    if tuple(pred.shape) != (B, pred_offset + L, N):
        raise ValueError(f"pred must have shape [{B}, {pred_offset + L}, {N}] for imgs of shape {tuple(imgs.shape)}, "
                         f"patch_size={patch_size} and pred_offset={pred_offset}, got {tuple(pred.shape)}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"mask must have shape [{B}, {L}], got {tuple(mask.shape)}")
    if norm_pix and N < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch, got p*p*C = {N}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    unfit = dispatch.triton_row_unfit(N)
    if N > CUDA_MAX_PATCH_VALUES:
        unfit["cuda"] = f"its kernel handles at most {CUDA_MAX_PATCH_VALUES} values per patch, got {N}"
    chosen = dispatch.choose("masked_patch_loss", backend, IMPLEMENTATIONS, (pred, imgs), unfit)
    return IMPLEMENTATIONS[chosen](pred, imgs, mask, patch_size, bool(norm_pix), float(eps), pred_offset, mean, std)
