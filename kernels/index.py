"""Inverting an index map: which slot, if any, picked each position."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mae_fast.kernels._launch import block, launch_fixed


@triton.jit
def invert_index_kernel(ids_ptr, inv_ptr, K, L, stride_b, stride_k, BLOCK_K: tl.constexpr):
    """inv[b, ids[b, k]] = k for every in-range index; out-of-range indices are ignored."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = k < K
    l = tl.load(ids_ptr + b * stride_b + k * stride_k, mask=in_k, other=-1).to(tl.int64)
    ok = in_k & (l >= 0) & (l < L)
    tl.store(inv_ptr + b * L + tl.where(ok, l, 0), k.to(tl.int32), mask=ok)


def invert_index(ids: torch.Tensor, length: int) -> torch.Tensor:
    """[B, K] indices into [0, length) -> [B, length] int32 holding k where ids[b, k] = l, else -1.

    Indices must be distinct within a row (as :func:`mae_fast.ops.sample_mask` makes them).
    """
    B, K = ids.shape
    inv = torch.full((B, length), -1, dtype=torch.int32, device=ids.device)
    if K and B:
        BLOCK_K = min(block(K), 1024)
        launch_fixed(invert_index_kernel, (B, triton.cdiv(K, BLOCK_K)), ids, inv, K, length, ids.stride(0),
                     ids.stride(1), BLOCK_K=BLOCK_K)
    return inv
