"""Triton kernels for ``gather_tokens`` and ``add_pos_embed``: gather kept tokens, add their positions, one pass.

Backward writes every element of the [B, L, D] gradient exactly once through the inverse of
``ids_keep`` (the kept token's gradient or zero): deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._launch import d_block, launch, row_tile_configs
from mae_fast.kernels.index import invert_index


@triton.jit
def gather_tokens_fwd_kernel(x_ptr, ids_ptr, pos_ptr, out_ptr, n_rows, K, L, D,
                             s_xb, s_xl, s_xd, s_ib, s_ik, s_pl, s_pd,
                             HAS_POS: tl.constexpr, GATHERED: tl.constexpr, BLOCK_D: tl.constexpr,
                             ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = d < D
    b = rows // K
    k = rows % K
    l = tl.load(ids_ptr + b * s_ib + k * s_ik, mask=row_ok, other=-1).to(tl.int64)
    ok = row_ok & (l >= 0) & (l < L)
    l = tl.where(ok, l, 0)
    m = ok[:, None] & col_ok[None, :]
    x_row = k if GATHERED else l  # GATHERED: x holds the kept tokens already, only positions are gathered
    vals = tl.load(x_ptr + (b * s_xb + x_row * s_xl)[:, None] + (d * s_xd)[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_POS:
        vals += tl.load(pos_ptr + (l * s_pl)[:, None] + (d * s_pd)[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + (rows * D)[:, None] + d[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def gather_tokens_bwd_kernel(grad_out_ptr, inv_ptr, grad_x_ptr, n_rows, K, L, D,
                             BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # one row per (b, l)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = d < D
    b = rows // L
    k = tl.load(inv_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    kept = row_ok & (k >= 0) & (k < K)
    g = tl.load(grad_out_ptr + ((b * K + tl.where(kept, k, 0)) * D)[:, None] + d[None, :],
                mask=kept[:, None] & col_ok[None, :], other=0.0)
    tl.store(grad_x_ptr + (rows * D)[:, None] + d[None, :], g, mask=row_ok[:, None] & col_ok[None, :])


gather_tokens_fwd_tuned = triton.autotune(
    row_tile_configs(warps=(2, 4, 8)), key=["D", "HAS_POS", "GATHERED"],
)(gather_tokens_fwd_kernel)
gather_tokens_bwd_tuned = triton.autotune(
    row_tile_configs(warps=(2, 4, 8)), key=["D"],
)(gather_tokens_bwd_kernel)


def gather_tokens_forward(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None, gathered: bool = False,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, L, D] (any strides), [B, K], [L, D] or None -> [B, K, D] contiguous in ``out_dtype`` (default: x's).

    ``gathered``: ``x`` is [B, K, D], the kept tokens in order, and only ``pos`` (required) is gathered.
    """
    B, D = x.shape[0], x.shape[2]
    L = pos.shape[0] if gathered else x.shape[1]
    K = ids_keep.shape[1]
    out = torch.empty(B, K, D, dtype=out_dtype or x.dtype, device=x.device)
    n_rows = B * K
    if n_rows and D:
        BLOCK_D = d_block(D)
        pos_arg = pos if pos is not None else x
        pos_strides = pos.stride() if pos is not None else (0, 0)
        launch(gather_tokens_fwd_kernel, gather_tokens_fwd_tuned,
               lambda meta: (triton.cdiv(n_rows, meta["ROWS"]), triton.cdiv(D, BLOCK_D)),
               x, ids_keep, pos_arg, out, n_rows, K, L, D, *x.stride(), *ids_keep.stride(), *pos_strides,
               HAS_POS=pos is not None, GATHERED=gathered, BLOCK_D=BLOCK_D, tile_width=BLOCK_D)
    return out


def gather_tokens_backward(grad_out: torch.Tensor, ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """[B, K, D] gradient -> [B, L, D] gradient of ``x`` (zero at tokens not kept)."""
    grad_out = grad_out.contiguous()
    B, K, D = grad_out.shape
    inv = invert_index(ids_keep, length)
    grad_x = torch.empty(B, length, D, dtype=grad_out.dtype, device=grad_out.device)
    n_rows = B * length
    if n_rows and D:
        BLOCK_D = d_block(D)
        launch(gather_tokens_bwd_kernel, gather_tokens_bwd_tuned,
               lambda meta: (triton.cdiv(n_rows, meta["ROWS"]), triton.cdiv(D, BLOCK_D)),
               grad_out, inv, grad_x, n_rows, K, length, D, BLOCK_D=BLOCK_D, tile_width=BLOCK_D)
    return grad_x
