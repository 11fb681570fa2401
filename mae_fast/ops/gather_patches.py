"""gather_patches: read only the kept patches of an image batch, in Conv2d weight order.

``out[b, k, (c * p + i) * p + j] = imgs[b, c, h * p + i, w * p + j]`` for the patch
``l = ids_keep[b, k] = h * grid_w + w``. With this order,
``out @ proj.weight.view(D, -1).T + proj.bias`` equals the Conv2d patch embedding of the kept
patches, so the encoder embeds only what it will see.

Byte floor: it must read and write B*K*C*p*p elements each way (forward), and write the full
image gradient B*C*H*W plus read B*K*C*p*p (backward).
"""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops._validate import check_indices as _check_index_range
from mae_fast.ops._validate import check_patch_size, check_same_device, check_tensor


def gather_patches_reference(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`gather_patches` (no input checks)."""
    B, C, H, W = imgs.shape
    p = patch_size
    gh, gw = H // p, W // p
    patches = imgs.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, C * p * p)
    return torch.gather(patches, 1, index)


def _fake(imgs, ids_keep, patch_size):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], imgs.shape[1] * patch_size * patch_size)


def _fake_backward(grad_out, ids_keep, patch_size, height, width):
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[2] // (patch_size * patch_size), height, width)


def _register_autograd(op, backward_op):
    """Autograd for a kernel backend's ``op`` whose backward is ``backward_op`` (Triton and CUDA alike)."""

    def setup_context(ctx, inputs, output):
        imgs, ids_keep, patch_size = inputs
        ctx.save_for_backward(ids_keep)
        ctx.patch_size, ctx.height, ctx.width = patch_size, imgs.shape[2], imgs.shape[3]

    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        return backward_op(grad_out, ids_keep, ctx.patch_size, ctx.height, ctx.width), None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


# Triton: kernels in kernels/gather_patches.py.
@torch.library.custom_op("mae_fast::gather_patches_triton", mutates_args=())
def _gather_patches_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    from mae_fast.kernels.gather_patches import gather_patches_forward
    return gather_patches_forward(imgs, ids_keep, patch_size)


@torch.library.custom_op("mae_fast::gather_patches_triton_backward", mutates_args=())
def _gather_patches_triton_backward(grad_out: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, height: int,
                                    width: int) -> torch.Tensor:
    from mae_fast.kernels.gather_patches import gather_patches_backward
    return gather_patches_backward(grad_out, ids_keep, patch_size, height, width)


_gather_patches_triton.register_fake(_fake)
_gather_patches_triton_backward.register_fake(_fake_backward)
_register_autograd(_gather_patches_triton, _gather_patches_triton_backward)


# CUDA: schemas and kernels in csrc/ (mae_fast._C); fake and autograd registered once it loads.
def _register_cuda():
    torch.library.register_fake("mae_fast::gather_patches_cuda", _fake)
    torch.library.register_fake("mae_fast::gather_patches_cuda_backward", _fake_backward)
    _register_autograd("mae_fast::gather_patches_cuda", torch.ops.mae_fast.gather_patches_cuda_backward)


def _gather_patches_cuda(imgs, ids_keep, patch_size):
    return torch.ops.mae_fast.gather_patches_cuda(imgs, ids_keep, patch_size)


dispatch.on_cuda_extension_load(_register_cuda)
IMPLEMENTATIONS = dispatch.register("gather_patches", torch=gather_patches_reference, triton=_gather_patches_triton,
                                    cuda=_gather_patches_cuda)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str = "auto",
                   check_indices: bool = True) -> torch.Tensor:
    """Gather the kept patches of ``imgs`` as flat vectors in Conv2d weight order (c, i, j).

    Args:
        imgs: [B, C, H, W] float32/float16/bfloat16 (float64 on the torch backend); any strides.
        ids_keep: [B, K] int64/int32 patch indices in [0, L), L = (H/p)*(W/p); K may be 0.
        patch_size: p, dividing H and W.
        backend: "auto", "cuda", "triton" or "torch" (see :mod:`mae_fast.ops.dispatch`).
        check_indices: verify that indices are in range (one device sync); pass False for
            indices from :func:`sample_mask`.

    Returns:
        [B, K, C*p*p] in the dtype of ``imgs``; differentiable w.r.t. ``imgs``.

    Raises:
        TypeError / ValueError: bad rank, dtype, device, batch mismatch, patch size or index.
        BackendUnavailableError: an explicit backend cannot run here.
    """
    check_tensor("imgs", imgs, ndim=4, float_only=True)
    check_tensor("ids_keep", ids_keep, ndim=2, int_only=True)
    check_same_device(imgs=imgs, ids_keep=ids_keep)
    gh, gw = check_patch_size(patch_size, imgs)
    if ids_keep.shape[0] != imgs.shape[0]:
        raise ValueError(f"ids_keep has batch size {ids_keep.shape[0]} but imgs has {imgs.shape[0]}")
    if check_indices:
        _check_index_range("ids_keep", ids_keep, gh * gw)
    chosen = dispatch.choose("gather_patches", backend, IMPLEMENTATIONS, (imgs, ids_keep))
    return IMPLEMENTATIONS[chosen](imgs, ids_keep, patch_size)
