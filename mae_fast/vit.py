"""The ViT classifier that MAE fine-tunes: the official ``models_vit.VisionTransformer`` under timm's key names.

A pretrained MAE encoder loads into it (the decoder is left out), and its fine-tuned state dict
has the official fine-tuned layout, which is timm ``VisionTransformer``'s: ``fc_norm.*`` and
``head.*`` with global pooling (the official default: the mean of the patch tokens, then a
LayerNorm), ``norm.*`` and ``head.*`` with the cls token. So official fine-tuned checkpoints load
into it as they are, and its checkpoints load with ``strict=True`` into
``timm.create_model(name, num_classes=N, global_pool="avg", fc_norm=True)`` (or
``global_pool="token"`` for the cls token).

Blocks are the MAE model's (:class:`mae_fast.model.Block`: attention on FlashAttention or SDPA,
stochastic depth through ``drop_path_rate``, rising linearly over the depth as in timm).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae_fast.attention import resolve_attn_backend
from mae_fast.model import Block, PatchEmbed
from mae_fast.pos_embed import get_2d_sincos_pos_embed
from mae_fast.presets import VIT_PRESETS

#: fine-tuning preset -> the pretraining preset with the same encoder, and the timm model with the same layout.
PRETRAIN_PRESET = {name: "mae_" + name for name in VIT_PRESETS}
TIMM_NAMES = {name: name + "_224" for name in VIT_PRESETS}


class VisionTransformer(nn.Module):
    """ViT for image classification (the official fine-tuning model).

    Args:
        img_size: int or (H, W), divisible by ``patch_size``.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the encoder (as :class:`mae_fast.MAEViT`'s).
        num_classes: the head's outputs; 0 for no head (features).
        global_pool: True (official default): the mean of the patch tokens through ``fc_norm``; False: the
            cls token after ``norm``.
        drop_path_rate: stochastic depth of the last block; block i drops with ``rate * i / (depth - 1)``.
        attn_backend: "auto", "flash_attn", "sdpa" or "math" (see :mod:`mae_fast.attention`).
        grad_checkpointing: recompute each block in backward to save activation memory.

    Shapes: images [B, C, H, W] float (normalized) -> logits [B, num_classes] (features [B, D] without a head).
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 global_pool: bool = True, drop_path_rate: float = 0.0, attn_backend: str = "auto",
                 norm_layer: Callable | None = None, grad_checkpointing: bool = False):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.attn_backend, self.grad_checkpointing = attn_backend, grad_checkpointing
        self.config = dict(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))  # learned
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm_layer, attn_backend, drop_path=r)
                                     for r in rates])
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """For training from scratch: sin-cos positions (then learned), xavier Linear, normal cls token.

        A pretrained encoder overwrites all of it but the head (see :func:`mae_fast.finetuner.load_encoder`).
        """
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)).float()[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the official recipe keeps out of weight decay (besides every 1-D one)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def attn_backend_for(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """The attention kernel the model runs for activations on ``device`` in ``dtype``."""
        head_dim = self.blocks[0].attn.head_dim if len(self.blocks) else None
        return resolve_attn_backend(self.attn_backend, torch.device(device), dtype, head_dim)

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` each block in place (they share code and shapes, so they compile once)."""
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> pooled features [B, D] (``fc_norm`` of the patch-token mean, or the normed cls token)."""
        C = self.patch_embed.proj.in_channels
        if imgs.dim() != 4 or imgs.shape[1] != C or tuple(imgs.shape[2:]) != self.patch_embed.img_size:
            raise ValueError(f"imgs must have shape [B, {C}, {self.patch_embed.img_size[0]}, "
                             f"{self.patch_embed.img_size[1]}], got {tuple(imgs.shape)}")
        x = self.patch_embed(imgs)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1) + self.pos_embed
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] (float32 under autocast is the caller's cast)."""
        return self.head(self.forward_features(imgs))

    def flops_per_image(self, training: bool = True) -> float:
        """Matrix-multiply FLOPs per image (2 per multiply-add; backward twice the forward when ``training``)."""
        cfg = self.config
        L, D = self.patch_embed.num_patches, cfg["embed_dim"]
        hidden, n = int(D * cfg["mlp_ratio"]), self.patch_embed.num_patches + 1
        per_block = 2 * n * D * (3 * D + D + 2 * hidden) + 4 * n * n * D
        forward = 2 * L * cfg["in_chans"] * cfg["patch_size"] ** 2 * D + cfg["depth"] * per_block
        forward += 2 * D * self.num_classes
        return float(forward * (3 if training else 1))


def create_vit(name: str, **kwargs) -> VisionTransformer:
    """A :data:`VIT_PRESETS` model; keyword arguments override the preset's (see :class:`VisionTransformer`).

    Raises:
        ValueError: an unknown preset name (the message lists them).
    """
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown model {name!r}; the presets are {', '.join(VIT_PRESETS)}")
    return VisionTransformer(**{**VIT_PRESETS[name][1], **kwargs})
