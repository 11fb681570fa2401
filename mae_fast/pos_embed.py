"""Fixed 2-D sin-cos position embeddings and their interpolation, as in the official MAE code."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, embed_dim] float64: sin of the first half of frequencies, then cos."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a 1-D sin-cos embedding, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """2-D sin-cos table of shape [(1 +) h*w, embed_dim], float64.

    The first half of the channels encodes the column (w), the second half the row (h): the
    official code builds ``np.meshgrid(grid_w, grid_h)`` and embeds its first plane first.
    With ``cls_token`` a zero row comes first.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate([get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w),
                          get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_extra_tokens: int = 1,
                          old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize a [1, extra + h*w, D] position table to another patch grid, bicubic.

    Extra (cls) rows are kept as they are; the grid rows are resized with
    ``F.interpolate(mode="bicubic", align_corners=False)`` as the official fine-tuning code does.

    Args:
        pos_embed: [1, num_extra_tokens + h*w, D].
        new_grid: the target grid (h', w').
        num_extra_tokens: rows before the grid (1 for the cls token).
        old_grid: the source grid; None means a square one.

    Raises:
        ValueError: the table's length does not match ``old_grid`` (or is not a square).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, N, D], got {tuple(pos_embed.shape)}")
    n_grid = pos_embed.shape[1] - num_extra_tokens
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(f"pos_embed holds {n_grid} grid positions, not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_grid:
        raise ValueError(f"old_grid={tuple(old_grid)} does not match the {n_grid} grid positions of pos_embed")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    D = pos_embed.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)
