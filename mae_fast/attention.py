"""Multi-head self-attention with selectable kernels.

Backends:

- ``flash_attn``: the FlashAttention package (``flash_attn_qkvpacked_func``); needs the package,
  CUDA tensors and float16/bfloat16.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, which runs PyTorch's own
  FlashAttention / cuDNN / memory-efficient kernels on GPUs and a fused CPU kernel elsewhere.
- ``math``: softmax(q k^T / sqrt(d)) v written out, the plain reference for tests.
- ``auto``: ``flash_attn`` when it can run on the inputs, otherwise ``sdpa``.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from mae_fast.errors import BackendUnavailableError, install_hint

ATTN_BACKENDS = ("auto", "flash_attn", "sdpa", "math")


_FLASH_ATTN: dict = {}  # filled once: "error" (why it cannot be imported, or None) and "func"


# Constant for a process: torch.compile evaluates it once while tracing instead of tracing the import.
@torch.compiler.assume_constant_result
def _flash_attn_import_error() -> str | None:
    if "error" not in _FLASH_ATTN:
        try:
            module = importlib.import_module("flash_attn")
            _FLASH_ATTN.update(error=None, func=module.flash_attn_qkvpacked_func)
        except Exception as exc:
            _FLASH_ATTN.update(error=f"the flash_attn package is not importable ({type(exc).__name__}: {exc}); "
                                     f"install it with {install_hint('flash')}", func=None)
    return _FLASH_ATTN["error"]


def flash_attn_unavailable_reason(device: torch.device | None = None, dtype: torch.dtype | None = None,
                                  head_dim: int | None = None) -> str | None:
    """Why the ``flash_attn`` backend cannot run (None if it can) for the given inputs."""
    error = _flash_attn_import_error()
    if error:
        return error
    if device is not None and device.type != "cuda":
        return f"FlashAttention needs CUDA tensors, got {device.type}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention needs float16 or bfloat16 inputs, got {dtype} (enable bf16 autocast)"
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"FlashAttention needs a head dimension that is a multiple of 8 and at most 256, got {head_dim}"
    return None


def check_attn_backend(backend: str) -> str:
    """Validate an attention backend name at construction time."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(map(repr, ATTN_BACKENDS))}; got {backend!r}")
    if backend == "flash_attn":
        reason = flash_attn_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"attn_backend='flash_attn' cannot run: {reason}")
    return backend


def resolve_attn_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The concrete backend that ``backend`` means for inputs on ``device`` in ``dtype``.

    Raises:
        BackendUnavailableError: ``backend="flash_attn"`` and FlashAttention cannot run on these inputs (a
            ``RuntimeError``).
    """
    if backend == "auto":
        return "flash_attn" if flash_attn_unavailable_reason(device, dtype, head_dim) is None else "sdpa"
    if backend == "flash_attn":
        reason = flash_attn_unavailable_reason(device, dtype, head_dim)
        if reason:
            raise BackendUnavailableError(f"attn_backend='flash_attn' cannot run: {reason}")
    return backend


def attention(qkv: torch.Tensor, backend: str) -> torch.Tensor:
    """Self-attention on packed projections.

    Args:
        qkv: [B, N, 3, H, Dh], the output of the fused qkv projection viewed per head.
        backend: one of :data:`ATTN_BACKENDS`.

    Returns:
        [B, N, H * Dh] in the dtype of ``qkv``.
    """
    B, N, _, H, Dh = qkv.shape
    backend = resolve_attn_backend(backend, qkv.device, qkv.dtype, Dh)
    if backend == "flash_attn":
        out = _FLASH_ATTN["func"](qkv.contiguous())  # [B, N, H, Dh]
        return out.reshape(B, N, H * Dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        scores = (q * Dh**-0.5) @ k.transpose(-2, -1)
        out = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(B, N, H * Dh)


class Attention(nn.Module):
    """timm-compatible attention: ``qkv`` (with bias) and ``proj`` Linear layers."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = check_attn_backend(attn_backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        return self.proj(attention(qkv, self.attn_backend))
