"""mae_fast: Masked Autoencoder pretraining for Vision Transformers at maximum throughput.

The model (:class:`MAEViT` and the presets) reproduces the official MAE exactly; the fused ops in
:mod:`mae_fast.ops` are usable on their own in other ViT projects.
"""

from mae_fast.model import (
    MODELS,
    MAEViT,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_small_patch16,
    mae_vit_tiny_patch16,
)

__version__ = "0.1.0"

__all__ = [
    "MAEViT",
    "MODELS",
    "create_model",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_small_patch16",
    "mae_vit_tiny_patch16",
]
