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


def _fake(x, ids_keep, pos_embed):
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2])


def _fake_backward(grad_out, ids_keep, length):
    return grad_out.new_empty(grad_out.shape[0], length, grad_out.shape[2])


def _register_autograd(op, backward_op):
    """Autograd for a kernel backend's ``op`` whose backward is ``backward_op`` (Triton and CUDA alike)."""

    def setup_context(ctx, inputs, output):
        x, ids_keep, pos_embed = inputs
        ctx.save_for_backward(ids_keep)
        ctx.length = x.shape[1]
        ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None

    def backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        need_x, _, need_pos = ctx.needs_input_grad
        if not (need_x or need_pos):
            return None, None, None
        grad_x = backward_op(grad_out, ids_keep, ctx.length)
        # The position gradient sums the batch: a fixed-order reduction, so it is deterministic.
        grad_pos = grad_x.sum(dim=0, dtype=torch.float32).to(ctx.pos_dtype) if need_pos else None
        return (grad_x if need_x else None), None, grad_pos

    torch.library.register_autograd(op, backward, setup_context=setup_context)


# Triton: kernels in kernels/gather_tokens.py.
@torch.library.custom_op("mae_fast::gather_tokens_triton", mutates_args=())
def _gather_tokens_triton(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    from mae_fast.kernels.gather_tokens import gather_tokens_forward
    return gather_tokens_forward(x, ids_keep, pos_embed)


@torch.library.custom_op("mae_fast::gather_tokens_triton_backward", mutates_args=())
def _gather_tokens_triton_backward(grad_out: torch.Tensor, ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    from mae_fast.kernels.gather_tokens import gather_tokens_backward
    return gather_tokens_backward(grad_out, ids_keep, length)


_gather_tokens_triton.register_fake(_fake)
_gather_tokens_triton_backward.register_fake(_fake_backward)
_register_autograd(_gather_tokens_triton, _gather_tokens_triton_backward)


# CUDA: schemas and kernels in csrc/ (mae_fast._C); fake and autograd registered once it loads.
def _register_cuda():
    torch.library.register_fake("mae_fast::gather_tokens_cuda", _fake)
    torch.library.register_fake("mae_fast::gather_tokens_cuda_backward", _fake_backward)
    _register_autograd("mae_fast::gather_tokens_cuda", torch.ops.mae_fast.gather_tokens_cuda_backward)


def _gather_tokens_cuda(x, ids_keep, pos_embed):
    return torch.ops.mae_fast.gather_tokens_cuda(x, ids_keep, pos_embed)


dispatch.on_cuda_extension_load(_register_cuda)
IMPLEMENTATIONS = dispatch.register("gather_tokens", torch=gather_tokens_reference, triton=_gather_tokens_triton,
                                    cuda=_gather_tokens_cuda)


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
