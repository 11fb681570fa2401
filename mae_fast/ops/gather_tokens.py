"""gather_tokens: pick the kept tokens of a sequence and add their position embeddings.

``out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]]``. Its sibling
:func:`add_pos_embed` adds the positions to tokens already gathered (the embedded patches):
``out[b, k] = x[b, k] + pos_embed[ids_keep[b, k]]``, with the same kernels.

Byte floor: read and write B*K*D elements (plus the K*D position rows it touches) forward;
backward writes the whole [B, L, D] gradient of x (zeros where not kept) and, when the
position table is trained, its [L, D] gradient.
"""

from __future__ import annotations

import torch

from mae_fast.ops import dispatch
from mae_fast.ops._validate import check_indices as _check_index_range
from mae_fast.ops._validate import FLOAT_DTYPES, check_same_device, check_tensor, pos_table


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


def bytes_moved(batch: int, length: int, num_kept: int, dim: int, x_dtype: torch.dtype, pos: bool = True,
                gathered: bool = False, out_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes the kernel backends move per call, by pass (``forward``, ``backward``), and the ``floor``.

    Forward reads the kept rows of ``x`` (``gathered``: all of ``x``, already [B, K, D]), the
    indices and the position table once (L*D*4: its rows are shared by the batch and stay in
    cache), and writes the [B, K, D] result. Backward (of ``x``) reads the result's gradient and
    writes ``x``'s whole gradient: [B, L, D], zeros where not kept (``gathered``: [B, K, D]).
    Both are at the floor.
    """
    e_x = x_dtype.itemsize
    e_out = (out_dtype or x_dtype).itemsize
    kept = batch * num_kept * dim
    forward = kept * (e_x + e_out) + batch * num_kept * 8 + (length * dim * 4 if pos else 0)
    grad_rows = kept if gathered else batch * length * dim
    backward = kept * e_out + grad_rows * e_x + batch * num_kept * 8 + (0 if gathered else batch * length * 4)
    return {"forward": forward, "backward": backward, "floor": forward + backward}


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


# CUDA: kernels in csrc/gather_tokens.cu (mae_fast._C); schema, fake and autograd defined here at import.
dispatch.define_cuda_op("gather_tokens_cuda(Tensor x, Tensor ids_keep, Tensor? pos_embed) -> Tensor", _fake)
dispatch.define_cuda_op("gather_tokens_cuda_backward(Tensor grad_out, Tensor ids_keep, int length) -> Tensor",
                        _fake_backward)
_register_autograd("mae_fast::gather_tokens_cuda", torch.ops.mae_fast.gather_tokens_cuda_backward)


def _gather_tokens_cuda(x, ids_keep, pos_embed):
    return torch.ops.mae_fast.gather_tokens_cuda(x, ids_keep, pos_embed)


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


# --------------------------------------------------------------------------- add_pos_embed

def add_pos_embed_reference(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-PyTorch definition of :func:`add_pos_embed`; ``pos_embed`` is [L, D]."""
    acc = _accumulate_dtype(torch.promote_types(x.dtype, pos_embed.dtype))
    out = x.to(acc) + pos_embed[ids_keep.long()].to(acc)
    return out.to(out_dtype or torch.promote_types(x.dtype, pos_embed.dtype))


def _fake_add(x, ids_keep, pos_embed, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("mae_fast::add_pos_embed_triton", mutates_args=())
def _add_pos_embed_triton(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor,
                          out_dtype: torch.dtype) -> torch.Tensor:
    from mae_fast.kernels.gather_tokens import gather_tokens_forward
    return gather_tokens_forward(x, ids_keep, pos_embed, gathered=True, out_dtype=out_dtype)


def _add_setup_context(ctx, inputs, output):
    x, ids_keep, pos_embed, _ = inputs
    ctx.save_for_backward(ids_keep)
    ctx.x_dtype, ctx.pos_dtype, ctx.length = x.dtype, pos_embed.dtype, pos_embed.shape[0]


def _add_backward(ctx, grad_out):
    (ids_keep,) = ctx.saved_tensors
    need_x, _, need_pos, _ = ctx.needs_input_grad
    grad_x = grad_out.to(ctx.x_dtype) if need_x else None
    grad_pos = None
    if need_pos:  # scatter the rows back through the kept indices, then sum the batch (fixed order)
        rows = _gather_tokens_triton_backward(grad_out.to(torch.float32).contiguous(), ids_keep, ctx.length)
        grad_pos = rows.sum(dim=0).to(ctx.pos_dtype)
    return grad_x, None, grad_pos, None


_add_pos_embed_triton.register_fake(_fake_add)
torch.library.register_autograd(_add_pos_embed_triton, _add_backward, setup_context=_add_setup_context)

ADD_IMPLEMENTATIONS = dispatch.register(
    "add_pos_embed", torch=add_pos_embed_reference,
    triton=lambda x, ids_keep, pos, out_dtype: _add_pos_embed_triton(
        x, ids_keep, pos, out_dtype or torch.promote_types(x.dtype, pos.dtype)))


def add_pos_embed(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor, backend: str = "auto",
                  check_indices: bool = True, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Add the positions of the kept tokens to tokens already gathered: ``x[b, k] + pos_embed[ids_keep[b, k]]``.

    One pass that reads ``x`` and the position rows and writes the sum, where gathering the
    positions with :func:`gather_tokens` and adding them would write and read them once more.
    The encoder uses it after embedding the gathered patches.

    Args:
        x: [B, K, D] float32/float16/bfloat16 (float64 on the torch backend); any strides.
        ids_keep: [B, K] int64/int32 in [0, L).
        pos_embed: [L, D] or [1, L, D] float.
        backend: "auto", "triton" or "torch" (no CUDA kernel: ``auto`` runs Triton on GPUs).
        check_indices: verify that indices are in range (one device sync).
        out_dtype: dtype of the result; default the promotion of ``x``'s and ``pos_embed``'s
            (float32 for bf16 tokens and a float32 table, as the official ``x + pos_embed`` gives).

    Returns:
        [B, K, D] in ``out_dtype``, summed in float32; differentiable w.r.t. ``x`` and ``pos_embed``.

    Raises:
        TypeError / ValueError: bad rank, dtype, device, shapes or index.
        BackendUnavailableError: an explicit backend cannot run here.
    """
    check_tensor("x", x, ndim=3, float_only=True)
    check_tensor("ids_keep", ids_keep, ndim=2, int_only=True)
    if not isinstance(pos_embed, torch.Tensor):
        raise TypeError(f"pos_embed must be a torch.Tensor, got {type(pos_embed).__name__}")
    B, K, D = x.shape
    L = pos_embed.shape[-2] if pos_embed.dim() >= 2 else -1
    pos = pos_table("pos_embed", pos_embed, L, D)
    check_same_device(x=x, ids_keep=ids_keep, pos_embed=pos)
    if tuple(ids_keep.shape) != (B, K):
        raise ValueError(f"ids_keep must have shape [{B}, {K}] (that of x's first two dimensions), "
                         f"got {tuple(ids_keep.shape)}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")
    if check_indices:
        _check_index_range("ids_keep", ids_keep, L)
    unfit = {"triton": "it writes float32, float16 or bfloat16, not float64"} if out_dtype == torch.float64 else None
    chosen = dispatch.choose("add_pos_embed", backend, ADD_IMPLEMENTATIONS, (x, ids_keep, pos), unfit)
    return ADD_IMPLEMENTATIONS[chosen](x, ids_keep, pos, out_dtype)
