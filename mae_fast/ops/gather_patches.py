"""gather_patches: read only the kept patches of an image batch, in Conv2d weight order.

``out[b, k, (c * p + i) * p + j] = imgs[b, c, h * p + i, w * p + j]`` for the patch
``l = ids_keep[b, k] = h * grid_w + w``. With this order,
``out @ proj.weight.view(D, -1).T + proj.bias`` equals the Conv2d patch embedding of the kept
patches, so the encoder embeds only what it will see.

Byte floor: it must read and write B*K*C*p*p elements each way (forward), and write the full
image gradient B*C*H*W plus read B*K*C*p*p (backward); :func:`bytes_moved` counts them. uint8
images (a quarter of float32's bytes) are normalized as they are read.
"""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops._validate import check_indices as _check_index_range
from mae_fast.ops._validate import FLOAT_DTYPES, check_patch_size, check_same_device, check_tensor
from mae_fast.ops.normalize import image_stats, normalize_images


def gather_patches_reference(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, mean=None, std=None,
                             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`gather_patches` (no input checks beyond ``mean``/``std``)."""
    if imgs.dtype == torch.uint8:
        imgs = normalize_images(imgs, mean, std)
    elif mean is not None or std is not None:
        image_stats(imgs, mean, std)  # raises: statistics are for uint8 images
    B, C, H, W = imgs.shape
    p = patch_size
    gh, gw = H // p, W // p
    patches = imgs.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, C * p * p)
    out = torch.gather(patches, 1, index)
    return out if out_dtype is None else out.to(out_dtype)


def bytes_moved(batch: int, channels: int, height: int, width: int, patch_size: int, num_kept: int,
                imgs_dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes the kernel backends move per call, by pass (``forward``, ``backward``), and the ``floor``.

    Forward reads the kept patches' pixels and the indices and writes the rows; backward reads
    the rows' gradient and writes the whole image gradient (zeros outside the kept patches).
    Both are at the floor.
    """
    e_in, e_out = imgs_dtype.itemsize, (out_dtype or imgs_dtype).itemsize
    kept = batch * num_kept * channels * patch_size**2
    forward = kept * (e_in + e_out) + batch * num_kept * 8
    num_patches = (height // patch_size) * (width // patch_size)
    backward = kept * e_out + batch * channels * height * width * e_in + batch * num_kept * 8 + batch * num_patches * 4
    return {"forward": forward, "backward": backward, "floor": forward + backward}


def _fake(imgs, ids_keep, patch_size, norm, out_dtype):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], imgs.shape[1] * patch_size * patch_size,
                          dtype=out_dtype)


def _fake_backward(grad_out, ids_keep, patch_size, height, width, imgs_dtype):
    return grad_out.new_empty(grad_out.shape[0], grad_out.shape[2] // (patch_size * patch_size), height, width,
                              dtype=imgs_dtype)


def _register_autograd(op, backward_op):
    """Autograd for a kernel backend's ``op`` whose backward is ``backward_op`` (Triton and CUDA alike)."""

    def setup_context(ctx, inputs, output):
        imgs, ids_keep, patch_size, _, _ = inputs
        ctx.save_for_backward(ids_keep)
        ctx.patch_size, ctx.height, ctx.width, ctx.imgs_dtype = patch_size, imgs.shape[2], imgs.shape[3], imgs.dtype

    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return backward_op(grad_out, ids_keep, ctx.patch_size, ctx.height, ctx.width, ctx.imgs_dtype), None, None, \
            None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


# Triton: kernels in kernels/gather_patches.py.
@torch.library.custom_op("mae_fast::gather_patches_triton", mutates_args=())
def _gather_patches_triton(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, norm: torch.Tensor | None,
                           out_dtype: torch.dtype) -> torch.Tensor:
    from mae_fast.kernels.gather_patches import gather_patches_forward
    return gather_patches_forward(imgs, ids_keep, patch_size, norm, out_dtype)


@torch.library.custom_op("mae_fast::gather_patches_triton_backward", mutates_args=())
def _gather_patches_triton_backward(grad_out: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, height: int,
                                    width: int, imgs_dtype: torch.dtype) -> torch.Tensor:
    from mae_fast.kernels.gather_patches import gather_patches_backward
    return gather_patches_backward(grad_out, ids_keep, patch_size, height, width, imgs_dtype)


_gather_patches_triton.register_fake(_fake)
_gather_patches_triton_backward.register_fake(_fake_backward)
_register_autograd(_gather_patches_triton, _gather_patches_triton_backward)


# CUDA: kernels in csrc/gather_patches.cu (mae_fast._C); schema, fake and autograd defined here at import.
dispatch.define_cuda_op("gather_patches_cuda(Tensor imgs, Tensor ids_keep, int patch_size, Tensor? norm, "
                        "ScalarType out_dtype) -> Tensor", _fake)
dispatch.define_cuda_op("gather_patches_cuda_backward(Tensor grad_out, Tensor ids_keep, int patch_size, int height, "
                        "int width, ScalarType imgs_dtype) -> Tensor", _fake_backward)
_register_autograd("mae_fast::gather_patches_cuda", torch.ops.mae_fast.gather_patches_cuda_backward)


def _fused(op):
    def run(imgs, ids_keep, patch_size, mean=None, std=None, out_dtype=None):
        default = torch.float32 if imgs.dtype == torch.uint8 else imgs.dtype
        return op(imgs, ids_keep, patch_size, image_stats(imgs, mean, std), out_dtype or default)

    return run


IMPLEMENTATIONS = dispatch.register("gather_patches", torch=gather_patches_reference,
                                    triton=_fused(_gather_patches_triton),
                                    cuda=_fused(torch.ops.mae_fast.gather_patches_cuda))


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str = "auto",
                   check_indices: bool = True, *, mean=None, std=None,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gather the kept patches of ``imgs`` as flat vectors in Conv2d weight order (c, i, j).

    Args:
        imgs: [B, C, H, W] float32/float16/bfloat16 (float64 on the torch backend), or uint8 with
            ``mean`` and ``std`` (normalized on the fly, bit for bit as
            :func:`mae_fast.ops.normalize.normalize_images` then this op); any strides (an NHWC
            batch as ``permute(0, 3, 1, 2)``).
        ids_keep: [B, K] int64/int32 patch indices in [0, L), L = (H/p)*(W/p); K may be 0.
        patch_size: p, dividing H and W.
        backend: "auto", "cuda", "triton" or "torch" (see :mod:`mae_fast.ops.dispatch`).
        check_indices: verify that indices are in range (one device sync); pass False for
            indices from :func:`sample_mask`.
        mean, std: C values each (0-255 scale) for uint8 ``imgs``; not allowed for float images.
        out_dtype: the dtype of the result (default: that of ``imgs``, float32 for uint8), so
            the rows come out in the dtype the embedding consumes (bf16 under autocast) without
            a separate cast.

    Returns:
        [B, K, C*p*p] in ``out_dtype``; differentiable w.r.t. float ``imgs`` (the gradient in
        their dtype).

    Raises:
        TypeError / ValueError: bad rank, dtype, device, batch mismatch, patch size, index or statistics.
        BackendUnavailableError: an explicit backend cannot run here (Triton: patch rows of more than
            4,096 values, p*p*C, see ``dispatch.TRITON_MAX_TILE``; auto passes over it then).
    """
    check_tensor("imgs", imgs, ndim=4, float_only=not (isinstance(imgs, torch.Tensor) and imgs.dtype == torch.uint8))
    check_tensor("ids_keep", ids_keep, ndim=2, int_only=True)
    check_same_device(imgs=imgs, ids_keep=ids_keep)
    gh, gw = check_patch_size(patch_size, imgs)
    if ids_keep.shape[0] != imgs.shape[0]:
        raise ValueError(f"ids_keep has batch size {ids_keep.shape[0]} but imgs has {imgs.shape[0]}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")
    if check_indices:
        _check_index_range("ids_keep", ids_keep, gh * gw)
    unfit = dispatch.triton_row_unfit(imgs.shape[1] * patch_size * patch_size)
    if out_dtype == torch.float64:
        unfit.update({b: "it writes float32, float16 or bfloat16 rows, not float64" for b in ("cuda", "triton")})
    chosen = dispatch.choose("gather_patches", backend, IMPLEMENTATIONS, (imgs, ids_keep), unfit)
    return IMPLEMENTATIONS[chosen](imgs, ids_keep, patch_size, mean, std, out_dtype)
