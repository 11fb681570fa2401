"""mae_fast: Masked Autoencoder pretraining for Vision Transformers at maximum throughput.

The model (:class:`MAEViT` and the presets) reproduces the official MAE exactly; the fused ops in
:mod:`mae_fast.ops` are usable on their own in other ViT projects.

The model's names load :mod:`mae_fast.model` (and torch) when first used, so that a command such as
``python -m mae_fast.pretrain --help`` or one with a mistake in its flags answers before torch loads.
"""

from __future__ import annotations

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


def __getattr__(name: str):
    if name in __all__:
        from mae_fast import model

        return getattr(model, name)
    raise AttributeError(f"module 'mae_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
