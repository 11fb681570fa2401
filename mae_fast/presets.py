"""The MAE presets by name: what each one is and the :class:`~mae_fast.model.MAEViT` arguments that build it; and
the fine-tuning models' (:data:`VIT_PRESETS`, the :class:`~mae_fast.vit.VisionTransformer` arguments).

Tables without torch, so that the command lines check a ``--model`` name and its patch size before torch loads;
:mod:`mae_fast.model` builds the MAE presets from them (``mae_vit_base_patch16()``, ``create_model(name)``) and
:mod:`mae_fast.vit` the fine-tuning ones (``create_vit(name)``).
"""

from __future__ import annotations

#: The presets: name -> (one-line description, MAEViT arguments). The last three are the official ones.
PRESETS: dict[str, tuple[str, dict]] = {
    "mae_vit_tiny_patch16": (
        "ViT-Ti/16 encoder (192 wide, 12 deep, 3 heads) with a light decoder (128, 2 blocks): for CPUs and demos",
        dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=2,
             decoder_num_heads=4, mlp_ratio=4)),
    "mae_vit_small_patch16": (
        "ViT-S/16 encoder (384 wide, 12 deep, 6 heads) with a 256-wide, 4-block decoder",
        dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4,
             decoder_num_heads=8, mlp_ratio=4)),
    "mae_vit_base_patch16": (
        "official mae_vit_base_patch16_dec512d8b (ViT-B/16, decoder 512 wide, 8 blocks)",
        dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
             decoder_num_heads=16, mlp_ratio=4)),
    "mae_vit_large_patch16": (
        "official mae_vit_large_patch16_dec512d8b (ViT-L/16, decoder 512 wide, 8 blocks)",
        dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
             decoder_num_heads=16, mlp_ratio=4)),
    "mae_vit_huge_patch14": (
        "official mae_vit_huge_patch14_dec512d8b (ViT-H/14, decoder 512 wide, 8 blocks)",
        dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
             decoder_num_heads=16, mlp_ratio=4)),
}

#: The fine-tuning models: name -> (description, :class:`~mae_fast.vit.VisionTransformer` arguments), the official
#: ones and two small ones.
VIT_PRESETS: dict[str, tuple[str, dict]] = {
    "vit_tiny_patch16": ("ViT-Ti/16 (192 wide, 12 deep, 3 heads): for CPUs and demos",
                         dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "vit_small_patch16": ("ViT-S/16 (384 wide, 12 deep, 6 heads)",
                          dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "vit_base_patch16": ("official vit_base_patch16 (ViT-B/16)",
                         dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
    "vit_large_patch16": ("official vit_large_patch16 (ViT-L/16)",
                          dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)),
    "vit_huge_patch14": ("official vit_huge_patch14 (ViT-H/14)",
                         dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)),
}

#: The presets that train in reasonable time on a CPU; the others are meant for GPUs.
CPU_PRESETS = ("mae_vit_tiny_patch16", "mae_vit_small_patch16")


def patch_size_of(name: str) -> int:
    """The patch size of a preset, without building it."""
    return PRESETS[name][1]["patch_size"]
