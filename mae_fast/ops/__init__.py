"""Fused MAE ops for any ViT project.

Every op takes ``backend="auto" | "cuda" | "triton" | "torch"``; ``auto`` picks the fastest
backend that can run on the inputs and falls back to the pure-PyTorch reference
(``<op>_reference``), which defines the op's semantics. See :mod:`mae_fast.ops.dispatch`.
Each op module also has ``bytes_moved(...)``: the bytes its kernels move, which the benchmarks
turn into achieved bandwidth. ``gather_patches`` and ``masked_patch_loss`` take uint8 images with
``mean``/``std`` (:mod:`mae_fast.ops.normalize`).
"""

from mae_fast.ops import dispatch
from mae_fast.ops.dispatch import BACKENDS, BackendUnavailableError
from mae_fast.ops.gather_patches import gather_patches, gather_patches_reference
from mae_fast.ops.gather_tokens import add_pos_embed, add_pos_embed_reference, gather_tokens, gather_tokens_reference
from mae_fast.ops.masked_patch_loss import masked_patch_loss, masked_patch_loss_reference
from mae_fast.ops.normalize import IMAGENET_MEAN_255, IMAGENET_STD_255, normalize_images
from mae_fast.ops.patchify import patchify, unpatchify
from mae_fast.ops.restore_tokens import restore_tokens, restore_tokens_reference
from mae_fast.ops.sample_mask import sample_mask

#: op name -> {backend name -> implementation}, for every fused op.
IMPLEMENTATIONS = dispatch.REGISTRY

__all__ = [
    "BACKENDS",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
    "BackendUnavailableError",
    "IMPLEMENTATIONS",
    "add_pos_embed",
    "add_pos_embed_reference",
    "gather_patches",
    "gather_patches_reference",
    "gather_tokens",
    "gather_tokens_reference",
    "masked_patch_loss",
    "masked_patch_loss_reference",
    "normalize_images",
    "patchify",
    "restore_tokens",
    "restore_tokens_reference",
    "sample_mask",
    "unpatchify",
]
