"""Triton kernels for ``masked_patch_loss``: masked patches only, the gradient recomputed in backward.

The forward program of a masked patch reads its prediction row and its pixels straight from the
image (patchified on the fly, never materialized; uint8 pixels normalized on the fly), computes
mean and unbiased variance in float32 and the patch's weighted loss. It writes one float per
patch: nothing for the gradient, nothing for visible patches, which read only their mask value.

Backward recomputes the masked patches the same way and writes the prediction gradient once, in
the prediction's dtype: ``diff * (2 * weight / N * grad_loss)`` in float32, rounded once (so
``loss / accum_iter`` rounds exactly as the reference does). Rows of visible patches, and the
leading ``pred_offset`` rows (the decoder's cls token), are written as zeros without reads.

Why recompute rather than save the gradient: per element of [B, L, N] with masked fraction m and
element sizes e_pred, e_img, recomputing moves ``2*m*(e_pred + e_img) + e_pred`` bytes per step,
saving a masked-rows gradient in pred's dtype ``m*(e_pred + e_img) + 2*m*e_pred + e_pred`` and
rounds twice. For the training path (bf16 pred, uint8 images) that is 6.5 against 7.25 bytes per
element at m = 0.75, so recomputing is both smaller and single-rounded. See
:func:`mae_fast.ops.masked_patch_loss.bytes_moved`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._launch import block, launch, row_tile_configs


@triton.jit
def _masked_rows(pred_ptr, imgs_ptr, norm_ptr, b, l, active, L_OFF, GW, N, C, eps,
                 s_pb, s_pl, s_pn, s_b, s_c, s_h, s_w,
                 P: tl.constexpr, NORM_PIX: tl.constexpr, U8: tl.constexpr, BLOCK_N: tl.constexpr):
    """Targets, predictions and differences of a tile of patch rows (zeros where not ``active``)."""
    n = tl.arange(0, BLOCK_N)
    col_ok = n < N
    i = n // (P * C)  # the official patchify order: row, column, channel (channel fastest)
    j = (n // C) % P
    c = n % C
    h = l // GW
    w = l % GW
    m = active[:, None] & col_ok[None, :]
    pix_off = (b * s_b + (h * P) * s_h + (w * P) * s_w)[:, None] + (c * s_c + i * s_h + j * s_w)[None, :]
    t = tl.load(imgs_ptr + pix_off, mask=m, other=0).to(tl.float32)
    if U8:  # (x - mean[c]) / std[c], correctly rounded as when normalizing first in float32
        mean_c = tl.load(norm_ptr + c, mask=col_ok, other=0.0)
        std_c = tl.load(norm_ptr + C + c, mask=col_ok, other=1.0)
        t = tl.where(m, tl.math.div_rn(t - mean_c[None, :], std_c[None, :]), 0.0)
    pred = tl.load(pred_ptr + (b * s_pb + (l + L_OFF) * s_pl)[:, None] + (n * s_pn)[None, :], mask=m,
                   other=0.0).to(tl.float32)
    rstd = tl.full((t.shape[0],), 1.0, tl.float32)
    if NORM_PIX:  # IEEE-rounded divides and square root (compiled Triton's `/` and tl.sqrt are approximate)
        mean = tl.math.div_rn(tl.sum(t, axis=1), N.to(tl.float32))
        centered = tl.where(m, t - mean[:, None], 0.0)
        var = tl.math.div_rn(tl.sum(centered * centered, axis=1), (N - 1).to(tl.float32))
        rstd = tl.math.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.math.sqrt_rn(var + eps))
        t = centered * rstd[:, None]
    diff = tl.where(m, pred - t, 0.0)
    return t, diff, rstd, m


@triton.jit
def _row_weight(mask_ptr, den_ptr, b, l, ok, s_mb, s_ml):
    weight = tl.load(mask_ptr + b * s_mb + l * s_ml, mask=ok, other=0.0).to(tl.float32)
    den = tl.load(den_ptr).to(tl.float32)
    return tl.math.div_rn(weight, tl.where(den > 0, den, 1.0))


@triton.jit
def masked_patch_loss_fwd_kernel(pred_ptr, imgs_ptr, norm_ptr, mask_ptr, den_ptr, loss_ptr,
                                 n_rows, L, L_OFF, GW, N, C, eps,
                                 s_pb, s_pl, s_pn, s_b, s_c, s_h, s_w, s_mb, s_ml,
                                 P: tl.constexpr, NORM_PIX: tl.constexpr, U8: tl.constexpr,
                                 BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # one row per patch (b, l)
    row_ok = rows < n_rows
    b = rows // L
    l = rows % L
    weight = _row_weight(mask_ptr, den_ptr, b, l, row_ok, s_mb, s_ml)
    active = row_ok & (weight != 0)
    _, diff, _, _ = _masked_rows(pred_ptr, imgs_ptr, norm_ptr, b, l, active, L_OFF, GW, N, C, eps,
                                 s_pb, s_pl, s_pn, s_b, s_c, s_h, s_w, P, NORM_PIX, U8, BLOCK_N)
    loss = tl.math.div_rn(tl.sum(diff * diff, axis=1), N.to(tl.float32))
    tl.store(loss_ptr + rows, loss * weight, mask=row_ok)


@triton.jit
def masked_patch_loss_bwd_kernel(pred_ptr, imgs_ptr, norm_ptr, mask_ptr, den_ptr, grad_loss_ptr, grad_pred_ptr,
                                 grad_imgs_ptr, n_rows, T, L_OFF, GW, N, C, H, W, eps,
                                 s_pb, s_pl, s_pn, s_b, s_c, s_h, s_w, s_mb, s_ml,
                                 P: tl.constexpr, NORM_PIX: tl.constexpr, U8: tl.constexpr, GRAD_PRED: tl.constexpr,
                                 GRAD_IMGS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # one row per token (b, t) of pred
    row_ok = rows < n_rows
    b = rows // T
    l = rows % T - L_OFF  # the patch; negative for the leading (cls) rows
    is_patch = row_ok & (l >= 0)
    l = tl.where(is_patch, l, 0)
    weight = _row_weight(mask_ptr, den_ptr, b, l, is_patch, s_mb, s_ml)
    active = is_patch & (weight != 0)
    t, diff, rstd, m = _masked_rows(pred_ptr, imgs_ptr, norm_ptr, b, l, active, L_OFF, GW, N, C, eps,
                                    s_pb, s_pl, s_pn, s_b, s_c, s_h, s_w, P, NORM_PIX, U8, BLOCK_N)
    scale = tl.load(grad_loss_ptr).to(tl.float32)
    g = diff * (tl.math.div_rn(2.0 * weight, N.to(tl.float32)) * scale)[:, None]  # d loss / d pred; d / d target = -g
    n = tl.arange(0, BLOCK_N)
    col_ok = n < N
    if GRAD_PRED:  # contiguous [B, T, N]: every row written, zeros where nothing was read
        tl.store(grad_pred_ptr + (rows * N)[:, None] + n[None, :], g.to(grad_pred_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    if GRAD_IMGS:  # contiguous [B, C, H, W]: each patch row writes its own pixels, zeros where visible
        g_t = -g
        if NORM_PIX:
            # t = (x - mean) * rstd: dx = rstd * (g_t - mean(g_t) - t * sum(g_t * t) / (N - 1))
            g_mean = tl.math.div_rn(tl.sum(g_t, axis=1), N.to(tl.float32))
            g_dot = tl.sum(g_t * t, axis=1)
            g_t = rstd[:, None] * (g_t - g_mean[:, None] - t * tl.math.div_rn(g_dot, (N - 1).to(tl.float32))[:, None])
        g_t = tl.where(m, g_t, 0.0)
        i = n // (P * C)
        j = (n // C) % P
        c = n % C
        h = l // GW
        w = l % GW
        out_off = (b * C * H * W + (h * P) * W + w * P)[:, None] + (c * H * W + i * W + j)[None, :]
        tl.store(grad_imgs_ptr + out_off, g_t.to(grad_imgs_ptr.dtype.element_ty),
                 mask=is_patch[:, None] & col_ok[None, :])


masked_patch_loss_fwd_tuned = triton.autotune(row_tile_configs(), key=["N", "P", "NORM_PIX", "U8"])(
    masked_patch_loss_fwd_kernel)
masked_patch_loss_bwd_tuned = triton.autotune(row_tile_configs(),
                                              key=["N", "P", "NORM_PIX", "U8", "GRAD_PRED", "GRAD_IMGS"])(
    masked_patch_loss_bwd_kernel)


def _geometry(imgs: torch.Tensor, patch_size: int):
    B, C, H, W = imgs.shape
    p = patch_size
    GW = W // p
    L = (H // p) * GW
    return B, C, H, W, L, GW, C * p * p


def masked_patch_loss_forward(pred: torch.Tensor, imgs: torch.Tensor, norm: torch.Tensor | None, mask: torch.Tensor,
                              patch_size: int, pred_offset: int, norm_pix: bool, eps: float) -> torch.Tensor:
    """The loss (float32 scalar). ``pred`` is [B, pred_offset + L, N]; ``norm`` the [2, C] mean/std of uint8 ``imgs``."""
    B, C, H, W, L, GW, N = _geometry(imgs, patch_size)
    den = mask.sum(dtype=torch.float32)
    per_patch = torch.empty(B * L, dtype=torch.float32, device=pred.device)
    n_rows = B * L
    if n_rows:
        launch(masked_patch_loss_fwd_kernel, masked_patch_loss_fwd_tuned,
               lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),),
               pred, imgs, norm if norm is not None else den, mask, den, per_patch, n_rows, L, pred_offset, GW, N, C,
               eps, *pred.stride(), *imgs.stride(), *mask.stride(),
               P=patch_size, NORM_PIX=norm_pix, U8=norm is not None, BLOCK_N=block(N), tile_width=block(N))
    return per_patch.sum()


def masked_patch_loss_backward(pred: torch.Tensor, imgs: torch.Tensor, norm: torch.Tensor | None, mask: torch.Tensor,
                               grad_loss: torch.Tensor, patch_size: int, pred_offset: int, norm_pix: bool, eps: float,
                               grad_pred: bool, grad_imgs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for ``grad_loss``: ``pred``'s ([B, pred_offset + L, N], its dtype; empty when not asked) and
    ``imgs``' ([B, C, H, W] contiguous, its dtype; empty when not asked)."""
    B, C, H, W, L, GW, N = _geometry(imgs, patch_size)
    T = pred.shape[1]
    den = mask.sum(dtype=torch.float32)
    gpred = torch.empty(pred.shape if grad_pred else (0,), dtype=pred.dtype, device=pred.device)
    gimgs = torch.empty((B, C, H, W) if grad_imgs else (0,), dtype=imgs.dtype, device=pred.device)
    n_rows = B * T
    if n_rows and (grad_pred or grad_imgs):
        launch(masked_patch_loss_bwd_kernel, masked_patch_loss_bwd_tuned,
               lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),),
               pred, imgs, norm if norm is not None else den, mask, den, grad_loss.to(torch.float32).reshape(1), gpred,
               gimgs, n_rows, T, pred_offset, GW, N, C, H, W, eps, *pred.stride(), *imgs.stride(), *mask.stride(),
               P=patch_size, NORM_PIX=norm_pix, U8=norm is not None, GRAD_PRED=grad_pred, GRAD_IMGS=grad_imgs,
               BLOCK_N=block(N), tile_width=block(N))
    return gpred, gimgs
