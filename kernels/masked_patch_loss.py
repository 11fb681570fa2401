"""Triton kernels for ``masked_patch_loss``: one pass per masked patch, gradient included.

The forward program of a masked patch reads its prediction row and its pixels straight from the
image (patchified on the fly, never materialized), computes mean and unbiased variance in float32,
the patch's weighted loss and, when asked, its gradient with respect to the prediction (and the
pixels), so backward only scales by the incoming gradient and never re-reads the image. Visible
patches read nothing but their mask value.

The saved gradient is float32 so that scaling it by any incoming gradient (``loss / accum_iter``
included) rounds once, exactly as the reference does.

Bytes per step (m = masked fraction, N = p*p*C, e_pred / e_img = element sizes): forward reads
m*B*L*N*(e_pred + e_img) and writes B*L*N*4 (saved gradient); backward reads m*B*L*N*4 and
writes B*L*N*e_pred. The floor is the forward's reads plus the final gradient's write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._launch import block, launch, row_tile_configs


@triton.jit
def masked_patch_loss_fwd_kernel(pred_ptr, imgs_ptr, mask_ptr, den_ptr, loss_ptr, grad_pred_ptr, grad_imgs_ptr,
                                 n_rows, L, GW, N, C, H, W, eps,
                                 s_pb, s_pl, s_pn, s_b, s_c, s_h, s_w, s_mb, s_ml,
                                 P: tl.constexpr, NORM_PIX: tl.constexpr, GRAD_PRED: tl.constexpr,
                                 GRAD_IMGS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # one row per (b, l)
    row_ok = rows < n_rows
    b = rows // L
    l = rows % L
    weight = tl.load(mask_ptr + b * s_mb + l * s_ml, mask=row_ok, other=0.0).to(tl.float32)
    den = tl.load(den_ptr).to(tl.float32)
    weight = weight / tl.where(den > 0, den, 1.0)
    active = row_ok & (weight != 0)

    n = tl.arange(0, BLOCK_N)
    col_ok = n < N
    i = n // (P * C)  # the official patchify order: row, column, channel (channel fastest)
    j = (n // C) % P
    c = n % C
    h = l // GW
    w = l % GW
    m = active[:, None] & col_ok[None, :]
    pix_off = (b * s_b + (h * P) * s_h + (w * P) * s_w)[:, None] + (c * s_c + i * s_h + j * s_w)[None, :]
    t = tl.load(imgs_ptr + pix_off, mask=m, other=0.0).to(tl.float32)
    pred = tl.load(pred_ptr + (b * s_pb + l * s_pl)[:, None] + (n * s_pn)[None, :], mask=m, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / N
        centered = tl.where(m, t - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / (N - 1)
        rstd = 1.0 / tl.sqrt(var + eps)
        t = centered * rstd[:, None]
    diff = tl.where(m, pred - t, 0.0)
    loss = tl.sum(diff * diff, axis=1) / N
    tl.store(loss_ptr + rows, loss * weight, mask=row_ok)
    # d(weighted loss)/d pred; d/d target is its negative.
    g = diff * (2.0 * weight / N)[:, None]
    if GRAD_PRED:
        # Visible rows get zeros (written, not read), so the saved gradient is fully defined.
        tl.store(grad_pred_ptr + (rows * N)[:, None] + n[None, :], g, mask=row_ok[:, None] & col_ok[None, :])
    if GRAD_IMGS:
        g_t = -g
        if NORM_PIX:
            # t = (x - mean) * rstd: dx = rstd * (g_t - mean(g_t) - t * sum(g_t * t) / (N - 1))
            g_mean = tl.sum(g_t, axis=1) / N
            g_dot = tl.sum(g_t * t, axis=1)
            g_t = rstd[:, None] * (g_t - g_mean[:, None] - t * (g_dot / (N - 1))[:, None])
        out_off = (b * C * H * W + (h * P) * W + w * P)[:, None] + (c * H * W + i * W + j)[None, :]
        tl.store(grad_imgs_ptr + out_off, g_t, mask=m)


@triton.jit
def masked_patch_loss_bwd_kernel(saved_ptr, mask_ptr, grad_loss_ptr, grad_pred_ptr, n_rows, L, N, s_mb, s_ml,
                                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b = rows // L
    l = rows % L
    weight = tl.load(mask_ptr + b * s_mb + l * s_ml, mask=row_ok, other=0.0).to(tl.float32)
    active = row_ok & (weight != 0)
    n = tl.arange(0, BLOCK_N)
    col_ok = n < N
    off = (rows * N)[:, None] + n[None, :]
    g = tl.load(saved_ptr + off, mask=active[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    g = g * tl.load(grad_loss_ptr).to(tl.float32)
    tl.store(grad_pred_ptr + off, g.to(grad_pred_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


masked_patch_loss_fwd_tuned = triton.autotune(row_tile_configs(), key=["N", "P", "NORM_PIX", "GRAD_PRED", "GRAD_IMGS"])(
    masked_patch_loss_fwd_kernel)
masked_patch_loss_bwd_tuned = triton.autotune(row_tile_configs(), key=["N"])(masked_patch_loss_bwd_kernel)


def masked_patch_loss_forward(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                              norm_pix: bool, eps: float, grad_pred: bool, grad_imgs: bool):
    """Loss and the gradients for an incoming gradient of 1.

    Returns:
        ``loss`` (float32 scalar), ``saved_grad_pred`` ([B, L, N] float32, zero on visible rows;
        empty when not asked), ``grad_imgs`` ([B, C, H, W] float32, zero outside
        masked patches; empty when not asked).
    """
    B, C, H, W = imgs.shape
    p = patch_size
    L, N, GW = (H // p) * (W // p), C * p * p, W // p
    device = pred.device
    den = mask.sum(dtype=torch.float32)
    per_patch = torch.empty(B * L, dtype=torch.float32, device=device)
    saved = torch.empty((B, L, N) if grad_pred else (0,), dtype=torch.float32, device=device)
    gimgs = torch.zeros((B, C, H, W) if grad_imgs else (0,), dtype=torch.float32, device=device)
    n_rows = B * L
    if n_rows:
        launch(masked_patch_loss_fwd_kernel, masked_patch_loss_fwd_tuned,
               lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),),
               pred, imgs, mask, den, per_patch, saved, gimgs, n_rows, L, GW, N, C, H, W, eps,
               *pred.stride(), *imgs.stride(), *mask.stride(),
               P=p, NORM_PIX=norm_pix, GRAD_PRED=grad_pred, GRAD_IMGS=grad_imgs, BLOCK_N=block(N))
    return per_patch.sum(), saved, gimgs


def masked_patch_loss_backward(saved_grad_pred: torch.Tensor, mask: torch.Tensor, grad_loss: torch.Tensor,
                               pred_dtype: torch.dtype) -> torch.Tensor:
    """Scale the saved gradient by the incoming one into ``pred_dtype``: masked rows scaled, visible rows zero."""
    B, L, N = saved_grad_pred.shape
    grad_pred = torch.empty(B, L, N, dtype=pred_dtype, device=saved_grad_pred.device)
    n_rows = B * L
    if n_rows:
        launch(masked_patch_loss_bwd_kernel, masked_patch_loss_bwd_tuned,
               lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),),
               saved_grad_pred, mask, grad_loss.to(torch.float32).reshape(1), grad_pred, n_rows, L, N,
               *mask.stride(), BLOCK_N=block(N))
    return grad_pred
