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


def bytes_moved(batch: int, length: int, num_kept: int, dim: int, x_dtype: torch.dtype,
                out_dtype: torch.dtype | None = None, pos: bool = True, num_sms: int = 132) -> dict[str, int]:
    """Bytes the kernel backends move per call, by pass (``forward``, ``backward``), and the ``floor``.

    Forward reads the visible tokens, the indices, the mask token and the position table once
    (shared by the batch), and writes the [B, L, D] sequence. Backward reads the sequence's
    gradient once and writes the visible tokens' gradient; the mask token's gradient costs one
    [D] float32 partial sum per thread block (the CUDA kernel runs 4 blocks per SM: ``num_sms``,
    132 on an H100 SXM or H200, 114 on an H100 PCIe), written, then read by a second small kernel
    that adds them.
    """
    e_x, e_out = x_dtype.itemsize, (out_dtype or x_dtype).itemsize
    visible, full = batch * num_kept * dim, batch * length * dim
    forward = visible * e_x + full * e_out + batch * length * 8 + (length * dim * 4 if pos else 0) + dim * 4
    partials = 4 * num_sms * dim * 4 * 2
    backward = full * e_out + visible * e_x + batch * length * 8 + partials + dim * 4
    floor = forward + full * e_out + visible * e_x + batch * length * 8 + dim * 4
    return {"forward": forward, "backward": backward, "floor": floor}


def _fake(x_visible, ids_restore, mask_token, pos_embed, out_dtype=None):
    B, _, D = x_visible.shape
    return x_visible.new_empty(B, ids_restore.shape[1], D, dtype=out_dtype or x_visible.dtype)


def _fake_backward(grad_out, ids_restore, num_visible, x_dtype):
    B, _, D = grad_out.shape
    return grad_out.new_empty(B, num_visible, D, dtype=x_dtype), grad_out.new_empty(D, dtype=torch.float32)


def _register_autograd(op, backward_op):
    """Autograd for a kernel backend's ``op`` whose backward is ``backward_op`` (Triton and CUDA alike)."""

    def setup_context(ctx, inputs, output):
        x_visible, ids_restore, mask_token, pos_embed = inputs[:4]  # out_dtype may be left out
        ctx.save_for_backward(ids_restore)
        ctx.num_visible, ctx.x_dtype, ctx.token_dtype = x_visible.shape[1], x_visible.dtype, mask_token.dtype
        ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None

    def backward(ctx, grad_out):
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_token, need_pos = ctx.needs_input_grad[:4]
        grad_x = grad_token = grad_pos = None
        if need_x or need_token:
            grad_x, grad_token = backward_op(grad_out, ids_restore, ctx.num_visible, ctx.x_dtype)
            grad_token = grad_token.to(ctx.token_dtype)
        if need_pos:
            grad_pos = grad_out.sum(dim=0, dtype=torch.float32).to(ctx.pos_dtype)
        grads = ((grad_x if need_x else None), None, (grad_token if need_token else None), grad_pos)
        return grads + (None,) * (len(ctx.needs_input_grad) - 4)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


# Triton: kernels in kernels/restore_tokens.py.
@torch.library.custom_op("mae_fast::restore_tokens_triton", mutates_args=())
def _restore_tokens_triton(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                           pos_embed: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    from mae_fast.kernels.restore_tokens import restore_tokens_forward
    return restore_tokens_forward(x_visible, ids_restore, mask_token, pos_embed, out_dtype or x_visible.dtype)


@torch.library.custom_op("mae_fast::restore_tokens_triton_backward", mutates_args=())
def _restore_tokens_triton_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                                    x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from mae_fast.kernels.restore_tokens import restore_tokens_backward
    return restore_tokens_backward(grad_out, ids_restore, num_visible, x_dtype)


_restore_tokens_triton.register_fake(_fake)
_restore_tokens_triton_backward.register_fake(_fake_backward)
_register_autograd(_restore_tokens_triton, _restore_tokens_triton_backward)


# CUDA: kernels in csrc/restore_tokens.cu (mae_fast._C); schema, fake and autograd defined here at import.
dispatch.define_cuda_op("restore_tokens_cuda(Tensor x_visible, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed, "
                        "ScalarType? out_dtype=None) -> Tensor", _fake)
dispatch.define_cuda_op("restore_tokens_cuda_backward(Tensor grad_out, Tensor ids_restore, int num_visible, "
                        "ScalarType x_dtype) -> (Tensor, Tensor)", _fake_backward)
_register_autograd("mae_fast::restore_tokens_cuda", torch.ops.mae_fast.restore_tokens_cuda_backward)


def _restore_tokens_cuda(x_visible, ids_restore, mask_token, pos_embed, out_dtype=None):
    return torch.ops.mae_fast.restore_tokens_cuda(x_visible, ids_restore, mask_token, pos_embed, out_dtype)


IMPLEMENTATIONS = dispatch.register("restore_tokens", torch=restore_tokens_reference, triton=_restore_tokens_triton,
                                    cuda=_restore_tokens_cuda)


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
