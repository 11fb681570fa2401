"""gather_tokens: pick the kept tokens of a sequence and add their position embeddings.

``out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]``.

Byte floor: read and write B*K*D elements (plus the K*D position rows it touches) forward;
backward writes the whole [B, L, D] gradient of x (zeros where not kept) and, when the
position table is trained, its [L, D] gradient.
"""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops._validate import check_indices as _check_index_range
from mae_fast.ops._validate import check_same_device, check_tensor, pos_table


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def gather_tokens_reference(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`gather_tokens`; ``pos_embed`` is [L, D] or None."""
    D = x.shape[-1]
    index = ids_keep.long()
    out = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, D)).to(_accumulate_dtype(x.dtype))
    if pos_embed is not None:
        out = out + pos_embed[index].to(out.dtype)
    return out.to(x.dtype)


IMPLEMENTATIONS = dispatch.register("gather_tokens", torch=gather_tokens_reference)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None,
                  backend: str = "auto", check_indices: bool = True) -> torch.Tensor:
    """Gather tokens ``x[b, ids_keep[b, k]]`` and add ``pos_embed[ids_keep[b, k]]`` in one pass.

    Args:
        x: [B, L, D] float32/float16/bfloat16 (float64 on the torch backend); any strides, a
            batch stride of 0 (an expanded table) included.
        ids_keep: [B, K] int64/int32 in [0, L).
        pos_embed: [L, D] or [1, L, D] float, or None. Added in float32.
        backend: "auto", "cuda", "triton" or "torch".
        check_indices: verify that indices are in range (one device sync).

    Returns:
        [B, K, D] in the dtype of ``x``; differentiable w.r.t. ``x`` and ``pos_embed``.

    Raises:
        TypeError / ValueError: bad rank, dtype, device, shapes or index.
        BackendUnavailableError: an explicit backend cannot run here.
    """
    check_tensor("x", x, ndim=3, float_only=True)
    check_tensor("ids_keep", ids_keep, ndim=2, int_only=True)
    B, L, D = x.shape
    pos = pos_table("pos_embed", pos_embed, L, D)
    check_same_device(x=x, ids_keep=ids_keep, pos_embed=pos)
    if ids_keep.shape[0] != B:
        raise ValueError(f"ids_keep has batch size {ids_keep.shape[0]} but x has {B}")
    if check_indices:
        _check_index_range("ids_keep", ids_keep, L)
    chosen = dispatch.choose("gather_tokens", backend, IMPLEMENTATIONS, (x, ids_keep, pos))
    return IMPLEMENTATIONS[chosen](x, ids_keep, pos)
