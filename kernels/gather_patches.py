"""Triton kernels for ``gather_patches``: read the kept patches straight from the image batch.

Forward tiles [ROWS kept patches, C*p*p]; backward writes every pixel of the image gradient exactly
once (a kept patch's gradient or zero), pulling through the inverse of ``ids_keep``: no atomics,
no separate zero fill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._launch import block, launch, row_tile_configs
from mae_fast.kernels.index import invert_index


@triton.jit
def conv_weight_order(n, P: tl.constexpr):
    """Position n of a patch vector in Conv2d weight order -> (channel, row, column) in the patch."""
    return n // (P * P), (n // P) % P, n % P


@triton.jit
def gather_patches_fwd_kernel(imgs_ptr, ids_ptr, norm_ptr, out_ptr, n_rows, K, L, GW, N, C,
                              s_b, s_c, s_h, s_w, s_ib, s_ik,
                              P: tl.constexpr, U8: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b = rows // K
    k = rows % K
    l = tl.load(ids_ptr + b * s_ib + k * s_ik, mask=row_ok, other=-1).to(tl.int64)
    ok = row_ok & (l >= 0) & (l < L)
    l = tl.where(ok, l, 0)
    h = l // GW
    w = l % GW
    n = tl.arange(0, BLOCK_N)
    c, i, j = conv_weight_order(n, P)
    col_ok = n < N
    src = (imgs_ptr + (b * s_b + (h * P) * s_h + (w * P) * s_w)[:, None]
           + (c * s_c + i * s_h + j * s_w)[None, :])
    vals = tl.load(src, mask=ok[:, None] & col_ok[None, :], other=0)
    if U8:  # (x - mean[c]) / std[c] in float32, correctly rounded as when normalizing first
        mean_c = tl.load(norm_ptr + c, mask=col_ok, other=0.0)
        std_c = tl.load(norm_ptr + C + c, mask=col_ok, other=1.0)
        vals = tl.where(ok[:, None], tl.math.div_rn(vals.to(tl.float32) - mean_c[None, :], std_c[None, :]), 0.0)
    tl.store(out_ptr + rows[:, None] * N + n[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def gather_patches_bwd_kernel(grad_out_ptr, inv_ptr, grad_imgs_ptr, n_rows, K, L, GW, N, C, H, W,
                              P: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # one row per patch of the image
    row_ok = rows < n_rows
    b = rows // L
    l = rows % L
    k = tl.load(inv_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    kept = row_ok & (k >= 0) & (k < K)
    h = l // GW
    w = l % GW
    n = tl.arange(0, BLOCK_N)
    c, i, j = conv_weight_order(n, P)
    col_ok = n < N
    g = tl.load(grad_out_ptr + (b * K + tl.where(kept, k, 0))[:, None] * N + n[None, :],
                mask=kept[:, None] & col_ok[None, :], other=0.0)
    dst = (grad_imgs_ptr + (b * C * H * W + (h * P) * W + w * P)[:, None] + (c * H * W + i * W + j)[None, :])
    tl.store(dst, g.to(grad_imgs_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


gather_patches_fwd_tuned = triton.autotune(row_tile_configs(), key=["N", "P", "U8"])(gather_patches_fwd_kernel)
gather_patches_bwd_tuned = triton.autotune(row_tile_configs(), key=["N", "P"])(gather_patches_bwd_kernel)


def gather_patches_forward(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, norm: torch.Tensor | None,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """[B, C, H, W] (any strides), [B, K] -> [B, K, C*p*p] contiguous in ``out_dtype``.

    ``norm``: the [2, C] float32 mean and std of uint8 ``imgs`` (None for float images).
    """
    B, C, H, W = imgs.shape
    K = ids_keep.shape[1]
    p = patch_size
    N, GW = C * p * p, W // p
    out = torch.empty(B, K, N, dtype=out_dtype, device=imgs.device)
    n_rows = B * K
    if n_rows:
        launch(gather_patches_fwd_kernel, gather_patches_fwd_tuned, lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),),
               imgs, ids_keep, norm if norm is not None else out, out, n_rows, K, (H // p) * GW, GW, N, C,
               *imgs.stride(), *ids_keep.stride(), P=p, U8=norm is not None, BLOCK_N=block(N), tile_width=block(N))
    return out


def gather_patches_backward(grad_out: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, height: int,
                            width: int, imgs_dtype: torch.dtype) -> torch.Tensor:
    """[B, K, C*p*p] gradient -> [B, C, H, W] image gradient in ``imgs_dtype`` (zero outside the kept patches)."""
    grad_out = grad_out.contiguous()
    B, K, N = grad_out.shape
    p = patch_size
    C, GW = N // (p * p), width // p
    L = (height // p) * GW
    inv = invert_index(ids_keep, L)
    grad_imgs = torch.empty(B, C, height, width, dtype=imgs_dtype, device=grad_out.device)
    n_rows = B * L
    if n_rows:
        launch(gather_patches_bwd_kernel, gather_patches_bwd_tuned, lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),),
               grad_out, inv, grad_imgs, n_rows, K, L, GW, N, C, height, width, P=p, BLOCK_N=block(N),
               tile_width=block(N))
    return grad_imgs
