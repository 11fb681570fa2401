"""Triton kernels for ``restore_tokens``: the decoder's full sequence in one pass.

Forward writes each output row once: the visible token ``x_visible[b, r]`` when ``r < K``, else
the mask token, plus the position row. Backward reads each gradient row once: rows of visible
tokens are stored into their slot of ``grad_x_visible`` (a permutation, so no two rows collide),
rows of mask tokens are summed per (sample, chunk) into a partial buffer that a fixed-order
reduction finishes: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._launch import d_block, interpreted, launch, launch_fixed, row_tile_configs


@triton.jit
def restore_tokens_fwd_kernel(x_ptr, ids_ptr, tok_ptr, pos_ptr, out_ptr, n_rows, K, L, D,
                              s_xb, s_xk, s_xd, s_ib, s_il, s_pl, s_pd,
                              HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # one row per (b, l)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = d < D
    b = rows // L
    l = rows % L
    r = tl.load(ids_ptr + b * s_ib + l * s_il, mask=row_ok, other=-1).to(tl.int64)
    visible = row_ok & (r >= 0) & (r < K)
    vals = tl.load(x_ptr + (b * s_xb + tl.where(visible, r, 0) * s_xk)[:, None] + (d * s_xd)[None, :],
                   mask=visible[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    token = tl.load(tok_ptr + d, mask=col_ok, other=0.0).to(tl.float32)
    vals = tl.where(visible[:, None], vals, token[None, :])
    if HAS_POS:
        vals += tl.load(pos_ptr + (l * s_pl)[:, None] + (d * s_pd)[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + (rows * D)[:, None] + d[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def restore_tokens_bwd_kernel(grad_out_ptr, ids_ptr, grad_x_ptr, partial_ptr, K, L, D, n_chunks,
                              s_ib, s_il, CHUNK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    l = chunk * CHUNK_L + tl.arange(0, CHUNK_L)
    l_ok = l < L
    col_ok = d < D
    r = tl.load(ids_ptr + b * s_ib + l * s_il, mask=l_ok, other=-1).to(tl.int64)
    visible = l_ok & (r >= 0) & (r < K)
    m = l_ok[:, None] & col_ok[None, :]
    g = tl.load(grad_out_ptr + ((b * L + l) * D)[:, None] + d[None, :], mask=m, other=0.0)
    tl.store(grad_x_ptr + ((b * K + tl.where(visible, r, 0)) * D)[:, None] + d[None, :],
             g.to(grad_x_ptr.dtype.element_ty), mask=visible[:, None] & col_ok[None, :])
    masked_sum = tl.sum(tl.where(visible[:, None], 0.0, g.to(tl.float32)), axis=0)
    tl.store(partial_ptr + (b * n_chunks + chunk) * D + d, masked_sum, mask=col_ok)


restore_tokens_fwd_tuned = triton.autotune(
    row_tile_configs(warps=(2, 4, 8)), key=["D"],
)(restore_tokens_fwd_kernel)


def restore_tokens_forward(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                           pos: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """[B, K, D] (any strides), [B, L], [D], [L, D] or None -> [B, L, D] contiguous in ``out_dtype``."""
    B, K, D = x_visible.shape
    L = ids_restore.shape[1]
    out = torch.empty(B, L, D, dtype=out_dtype, device=x_visible.device)
    n_rows = B * L
    if n_rows and D:
        BLOCK_D = d_block(D)
        pos_arg = pos if pos is not None else mask_token
        pos_strides = pos.stride() if pos is not None else (0, 0)
        launch(restore_tokens_fwd_kernel, restore_tokens_fwd_tuned,
               lambda meta: (triton.cdiv(n_rows, meta["ROWS"]), triton.cdiv(D, BLOCK_D)),
               x_visible, ids_restore, mask_token.contiguous(), pos_arg, out, n_rows, K, L, D,
               *x_visible.stride(), *ids_restore.stride(), *pos_strides, HAS_POS=pos is not None, BLOCK_D=BLOCK_D,
               tile_width=BLOCK_D)
    return out


def restore_tokens_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                            x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, D] gradient -> (grad_x_visible [B, K, D] in ``x_dtype``, mask-token gradient [D] float32).

    ``ids_restore`` must be a permutation of [0, L) per row, so every visible slot is written.
    """
    grad_out = grad_out.contiguous()
    B, L, D = grad_out.shape
    K = num_visible
    grad_x = torch.empty(B, K, D, dtype=x_dtype, device=grad_out.device)
    CHUNK_L = 64 if interpreted() else 16
    BLOCK_D = min(d_block(D), 256)
    n_chunks = triton.cdiv(L, CHUNK_L)
    partial = torch.empty(B, n_chunks, D, dtype=torch.float32, device=grad_out.device)
    if B and L and D:
        launch_fixed(restore_tokens_bwd_kernel, (B, n_chunks, triton.cdiv(D, BLOCK_D)), grad_out, ids_restore, grad_x,
                     partial, K, L, D, n_chunks, *ids_restore.stride(), CHUNK_L=CHUNK_L, BLOCK_D=BLOCK_D, num_warps=4)
    return grad_x, partial.sum(dim=(0, 1))
