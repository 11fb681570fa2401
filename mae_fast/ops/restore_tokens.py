"""restore_tokens: unshuffle the visible tokens into the full sequence, mask tokens elsewhere.

``out[b, l] = (x_visible[b, r] if r < K else mask_token) + pos_embed[l]`` with
``r = ids_restore[b, l]``: the official decoder's append-mask-tokens, gather and position add,
in one pass.

Byte floor: read B*K*D, write B*L*D (forward); read B*L*D, write B*K*D (+ D and L*D for the
mask token and position gradients) backward.
"""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops._validate import check_indices as _check_index_range
from mae_fast.ops._validate import FLOAT_DTYPES, check_same_device, check_tensor, pos_table


def restore_tokens_reference(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                             pos_embed: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`restore_tokens`; ``mask_token`` is [D], ``pos_embed`` [L, D] or None."""
    B, K, D = x_visible.shape
    L = ids_restore.shape[1]
    acc = torch.promote_types(x_visible.dtype, torch.float32)
    full = torch.cat([x_visible.to(acc), mask_token.to(acc).expand(B, L - K, D)], dim=1)
    out = torch.gather(full, 1, ids_restore.long().unsqueeze(-1).expand(-1, -1, D))
    if pos_embed is not None:
        out = out + pos_embed.to(acc)
    return out.to(out_dtype or x_visible.dtype)


IMPLEMENTATIONS = dispatch.register("restore_tokens", torch=restore_tokens_reference)


def restore_tokens(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor | None = None, backend: str = "auto",
                   check_indices: bool = True, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Write the full token sequence from the visible tokens and the mask token, plus positions.

    Args:
        x_visible: [B, K, D] float32/float16/bfloat16 (float64 on the torch backend), K <= L;
            any strides (e.g. ``x[:, 1:]`` after a cls token).
        ids_restore: [B, L] int64/int32 in [0, L): the unshuffle indices from :func:`sample_mask`.
        mask_token: [D] or [1, 1, D] float.
        pos_embed: [L, D] or [1, L, D] float, or None.
        backend: "auto", "cuda", "triton" or "torch".
        check_indices: verify that indices are in range (one device sync).
        out_dtype: dtype of the result (float32/float16/bfloat16); default that of ``x_visible``.
            The model asks for float32 under autocast, as the official decoder's concatenation
            with the float32 mask token gives.

    Returns:
        [B, L, D] in ``out_dtype``; differentiable w.r.t. ``x_visible``,
        ``mask_token`` and ``pos_embed``.

    Raises:
        TypeError / ValueError: bad rank, dtype, device, shapes or index.
        BackendUnavailableError: an explicit backend cannot run here.
    """
    check_tensor("x_visible", x_visible, ndim=3, float_only=True)
    check_tensor("ids_restore", ids_restore, ndim=2, int_only=True)
    check_tensor("mask_token", mask_token, ndim=(1, 3), float_only=True)
    B, K, D = x_visible.shape
    L = ids_restore.shape[1]
    if ids_restore.shape[0] != B:
        raise ValueError(f"ids_restore has batch size {ids_restore.shape[0]} but x_visible has {B}")
    if K > L:
        raise ValueError(f"x_visible has {K} tokens but ids_restore has only {L} positions")
    if mask_token.numel() != D or (mask_token.dim() == 3 and mask_token.shape[:2] != (1, 1)):
        raise ValueError(f"mask_token must have shape [{D}] or [1, 1, {D}], got {tuple(mask_token.shape)}")
    mask_token = mask_token.reshape(D)
    pos = pos_table("pos_embed", pos_embed, L, D)
    check_same_device(x_visible=x_visible, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")
    if check_indices:
        _check_index_range("ids_restore", ids_restore, L)
    chosen = dispatch.choose("restore_tokens", backend, IMPLEMENTATIONS, (x_visible, ids_restore, mask_token, pos))
    return IMPLEMENTATIONS[chosen](x_visible, ids_restore, mask_token, pos, out_dtype)
