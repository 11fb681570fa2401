"""MAEViT: the official MAE ``MaskedAutoencoderViT``, run on the visible tokens only.

Semantics, parameter names and initialization follow the official code exactly, so official
checkpoints load as they are and published recipes reproduce. What differs is only how the work
is done: the encoder gathers and embeds the kept patches alone (``gather_patches``), positions are
gathered with ``gather_tokens``, the decoder input is written in one pass by ``restore_tokens``,
and the loss is computed on the masked patches by ``masked_patch_loss``; each op picks its fastest
backend (see :mod:`mae_fast.ops`).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae_fast.attention import Attention, resolve_attn_backend
from mae_fast.ops import (IMAGENET_MEAN_255, IMAGENET_STD_255, add_pos_embed, gather_patches, masked_patch_loss,
                          normalize_images, patchify, restore_tokens, sample_mask, unpatchify)
from mae_fast.ops.dispatch import check_backend
from mae_fast.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from mae_fast.presets import PRESETS

logger = logging.getLogger("mae_fast")


def _matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matrix multiply on ``device`` runs in: autocast's when it is on there, else ``dtype``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class PatchEmbed(nn.Module):
    """Image to patch tokens with a Conv2d of kernel = stride = patch size (timm's key names)."""

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = _pair(img_size, "img_size")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide img_size={self.img_size}")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, D], all patches."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random ``drop_prob`` of the samples and scale
    the others by ``1 / (1 - drop_prob)``; the identity in evaluation (timm's ``DropPath``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; ``drop_path`` (stochastic
    depth, fine-tuning) drops each residual branch per sample."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_layer: Callable = nn.LayerNorm,
                 attn_backend: str = "auto", drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attn_backend=attn_backend)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MAEViT(nn.Module):
    """Masked Autoencoder with a ViT backbone (the official ``MaskedAutoencoderViT``).

    Args:
        img_size: int or (H, W); need not be square.
        patch_size: p, dividing H and W.
        in_chans: image channels C.
        embed_dim, depth, num_heads: the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder.
        mlp_ratio: MLP hidden size over embedding size.
        norm_layer: normalization constructor; LayerNorm with eps 1e-6 as in the official presets.
        norm_pix_loss: normalize each target patch by its mean and unbiased variance.
        attn_backend: "auto", "flash_attn", "sdpa" or "math" (see :mod:`mae_fast.attention`).
        kernel_backend: "auto", "cuda", "triton" or "torch" for the fused ops (see :mod:`mae_fast.ops`).
        grad_checkpointing: recompute each block in backward to save activation memory.

    Shapes: images [B, C, H, W]; L = (H/p)*(W/p) patches; K = int(L * (1 - mask_ratio)) kept.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_layer: Callable | None = None, norm_pix_loss: bool = False,
                 attn_backend: str = "auto", kernel_backend: str = "auto", grad_checkpointing: bool = False):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.kernel_backend = check_backend(kernel_backend, "kernel_backend")
        self.kernel_backends: dict[str, str] = {}  # per-op choices that override kernel_backend
        self.attn_backend = attn_backend
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm_layer, attn_backend)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer,
                                                   attn_backend) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        # How uint8 images are normalized (0-255 scale): ImageNet's statistics, as the loaders use. Not
        # saved in checkpoints (official key names only); copy other statistics into them to change them.
        mean, std = (IMAGENET_MEAN_255, IMAGENET_STD_255) if in_chans == 3 else ((127.5,) * in_chans,) * 2
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.config = dict(img_size=self.patch_embed.img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                           decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_pix_loss=norm_pix_loss)
        self.initialize_weights()

    # ------------------------------------------------------------------ init

    def initialize_weights(self) -> None:
        """The official initialization (fixed sin-cos positions, xavier Linear, normal tokens)."""
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(
            torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)).float()[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ helpers

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] in the official order."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W] on this model's patch grid."""
        return unpatchify(x, self.patch_size, self.patch_embed.grid_size)

    def op_backend(self, op: str) -> str:
        """The backend the model passes to fused op ``op``: its entry in ``kernel_backends``, else ``kernel_backend``."""
        return self.kernel_backends.get(op, self.kernel_backend)

    def set_kernel_backends(self, backends: dict[str, str]) -> None:
        """Run each fused op named in ``backends`` on the backend given there (the trainer's verified choices).

        Raises:
            ValueError: an unknown op or backend name.
        """
        from mae_fast.ops import IMPLEMENTATIONS
        for op, backend in backends.items():
            if op not in IMPLEMENTATIONS:
                raise ValueError(f"unknown fused op {op!r}; the ops are {', '.join(IMPLEMENTATIONS)}")
            check_backend(backend, f"the backend of {op}")
        self.kernel_backends = dict(backends)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Official ``random_masking`` on a token sequence [B, L, D] -> (x_masked, mask, ids_restore)."""
        from mae_fast.masking import random_masking
        return random_masking(x, mask_ratio, noise, backend=self.op_backend("gather_tokens"))

    def attn_backend_for(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """The attention kernel the model runs for activations on ``device`` in ``dtype``."""
        head_dim = self.blocks[0].attn.head_dim if len(self.blocks) else None
        return resolve_attn_backend(self.attn_backend, torch.device(device), dtype, head_dim)

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            raise ValueError(f"imgs must be a [B, C, H, W] tensor, got {getattr(imgs, 'shape', type(imgs))}")
        C = self.patch_embed.proj.in_channels
        if imgs.shape[1] != C or tuple(imgs.shape[2:]) != self.patch_embed.img_size:
            raise ValueError(f"imgs must have shape [B, {C}, {self.patch_embed.img_size[0]}, "
                             f"{self.patch_embed.img_size[1]}], got {tuple(imgs.shape)}")

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def compile_blocks(self, **compile_kwargs) -> None:
        """Regional compilation: ``torch.compile`` each encoder and decoder block in place.

        The blocks of a stack share their code and shapes, so the encoder's blocks compile once and
        the decoder's once, with the fusions inside a block (layer norms, attention, MLP) and the
        fused ops left as they are. Measured on a 2-core CPU, ViT-B/16's first training step at
        64 px took 30 s this way against 85 s for ``torch.compile`` of the whole model.
        ``compile_kwargs`` go to ``nn.Module.compile`` (``mode=...``, ``dynamic=...``).
        """
        for block in (*self.blocks, *self.decoder_blocks):
            block.compile(**compile_kwargs)

    # ------------------------------------------------------------------ MAE

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Mask, embed the kept patches only, and encode.

        Returns:
            ``latent`` [B, 1 + K, D], ``mask`` [B, L] float32 (1 = removed), ``ids_restore`` [B, L] int64.
        """
        self._check_imgs(imgs)
        B = imgs.shape[0]
        ids_keep, ids_restore, mask = sample_mask(B, self.num_patches, mask_ratio, noise=noise, device=imgs.device)
        # Embedding the gathered patches with the conv weight as a matrix equals the conv on them. The rows
        # come out in the dtype the matrix multiply runs in (bf16 under autocast), uint8 images normalized.
        proj = self.patch_embed.proj
        patches = gather_patches(imgs, ids_keep, self.patch_size, backend=self.op_backend("gather_patches"), check_indices=False,
                                 out_dtype=_matmul_dtype(imgs.device, proj.weight.dtype), **self._pixel_stats(imgs))
        x = F.linear(patches, proj.weight.view(proj.out_channels, -1), proj.bias)
        # The official x + pos_embed (float32 under autocast), positions gathered and added in one pass.
        x = add_pos_embed(x, ids_keep, self.pos_embed[0, 1:], backend=self.op_backend("add_pos_embed"),
                          check_indices=False)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Decode ``latent`` [B, 1 + K, D] to per-patch pixel predictions [B, L, p*p*C]."""
        return self._decode(latent, ids_restore)[:, 1:]

    def _decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The whole decoder output [B, 1 + L, p*p*C], its cls token's prediction first."""
        x = self.decoder_embed(latent)
        # The official concatenation with the float32 mask token promotes to float32 under autocast.
        out_dtype = torch.promote_types(x.dtype, self.mask_token.dtype)
        tokens = restore_tokens(x[:, 1:], ids_restore, self.mask_token, self.decoder_pos_embed[:, 1:],
                                backend=self.op_backend("restore_tokens"), check_indices=False, out_dtype=out_dtype)
        cls = x[:, :1] + self.decoder_pos_embed[:, :1]
        x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        x = self._run_blocks(self.decoder_blocks, x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches (float32 scalar), official semantics.

        ``pred`` is [B, L, p*p*C], or the whole decoder output [B, 1 + L, p*p*C] (its first token
        is then skipped without a copy); ``imgs`` float, or uint8 (normalized by the model's
        ``pixel_mean``/``pixel_std``).
        """
        offset = pred.shape[1] - self.num_patches
        return masked_patch_loss(pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss,
                                 backend=self.op_backend("masked_patch_loss"), pred_offset=max(offset, 0),
                                 **self._pixel_stats(imgs))

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                return_pred: bool = True, valid: torch.Tensor | None = None):
        """Returns ``(loss, pred, mask)``: float32 scalar, [B, L, p*p*C], [B, L] float32.

        ``return_pred=False`` gives ``None`` for ``pred`` (the training step's choice: ``pred`` is a
        view of the decoder output, which a sharded wrapper warns about returning).

        ``valid`` ([B] bool or float on the images' device, optional) weights each image in the loss: an image
        with 0 (a loader's padding slot, or one that did not decode) takes no part in it, and a batch with none
        valid has loss 0. It is applied to the loss's mask on the device, so the step stays free of host
        synchronization and compiles to one graph.

        ``imgs`` is [B, C, H, W]: normalized float images, or uint8 pixels (any strides, so an NHWC
        batch as ``permute(0, 3, 1, 2)``) that the fused ops normalize by ``pixel_mean`` and
        ``pixel_std`` (ImageNet's, in the 0-255 scale) as they read them.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        out = self._decode(latent, ids_restore)
        # The loss takes the whole output with an offset: slicing off the cls token would make backward
        # zero-fill and copy the whole gradient.
        scored = mask if valid is None else mask * valid.to(mask.dtype)[:, None]
        loss = self.forward_loss(imgs, out, scored)
        return loss, (out[:, 1:] if return_pred else None), mask

    def _pixel_stats(self, imgs: torch.Tensor) -> dict:
        if imgs.dtype != torch.uint8:
            return {}
        return {"mean": self.pixel_mean, "std": self.pixel_std}

    # ------------------------------------------------------------------ inference

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encode all patches without masking: [B, C, H, W] -> [B, 1 + L, D] (after the final norm)."""
        self._check_imgs(imgs)
        if imgs.dtype == torch.uint8:
            imgs = normalize_images(imgs, self.pixel_mean, self.pixel_std)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        return self.norm(self._run_blocks(self.blocks, x))

    def extract_features(self, imgs: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Feature vectors [B, D]: the mean of the patch tokens (``pool="mean"``) or the cls token."""
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        x = self.forward_features(imgs)
        return x[:, 1:].mean(dim=1) if pool == "mean" else x[:, 0]

    # ------------------------------------------------------------------ accounting

    def flops_per_image(self, mask_ratio: float = 0.75, training: bool = True) -> float:
        """Matrix-multiply FLOPs per image of what this model computes (embedding the kept patches only).

        Counts 2 FLOPs per multiply-add in every Linear, the patch embedding and attention's two
        batched products; training counts backward as twice the forward.
        """
        L = self.num_patches
        K = int(L * (1 - mask_ratio))
        cfg = self.config
        p, C = cfg["patch_size"], cfg["in_chans"]
        D, Dd = cfg["embed_dim"], cfg["decoder_embed_dim"]
        hidden, hidden_d = int(D * cfg["mlp_ratio"]), int(Dd * cfg["mlp_ratio"])

        def blocks(n_tokens: int, dim: int, hid: int, depth: int) -> float:
            per_block = 2 * n_tokens * dim * (3 * dim + dim + 2 * hid) + 4 * n_tokens**2 * dim
            return depth * per_block

        forward = (2 * K * C * p * p * D
                   + blocks(1 + K, D, hidden, cfg["depth"])
                   + 2 * (1 + K) * D * Dd
                   + blocks(1 + L, Dd, hidden_d, cfg["decoder_depth"])
                   + 2 * (1 + L) * Dd * p * p * C)
        return float(forward * (3 if training else 1))

    # ------------------------------------------------------------------ checkpoints

    def load_pretrained(self, checkpoint, strict_encoder: bool = True) -> dict:
        """Load an official (or mae_fast) checkpoint: a path (``.pth``, ``.safetensors`` as ``mae_fast.export``
        writes, or a ``.dcp`` checkpoint folder as ``--checkpoint_format dcp`` writes), a full checkpoint dict, or a
        ``model`` state dict.

        Position embeddings made for another patch grid are resized bicubically (as the official
        fine-tuning code does). Encoder-only releases load with the decoder left at its
        initialization, and the loader logs the decoder keys it did not find.

        Returns:
            ``{"missing_keys": [...], "unexpected_keys": [...], "interpolated": [...]}``.

        Raises:
            ValueError: not a state dict, or encoder keys missing when ``strict_encoder``, or a
                parameter whose shape does not fit this model.
            CheckpointError: a file that cannot be read (truncated, not a checkpoint, or holding objects
                other than tensors).
        """
        if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
            from mae_fast.checkpoint import load_file, load_safetensors

            if str(os.fspath(checkpoint)).endswith(".safetensors"):  # as mae_fast.export writes them
                checkpoint = load_safetensors(checkpoint)
            else:
                checkpoint = load_file(os.fspath(checkpoint))
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("checkpoint must be a state dict of tensors or a dict with a 'model' state dict")
        state = dict(state)
        interpolated = []
        for key in ("pos_embed", "decoder_pos_embed"):
            if key in state and state[key].shape != getattr(self, key).shape:
                state[key] = interpolate_pos_embed(state[key], self.patch_embed.grid_size)
                interpolated.append(key)
        # Validate everything before touching a parameter: a refused checkpoint leaves the model as it was.
        own = self.state_dict()
        for key, value in state.items():
            if key in own and own[key].shape != value.shape:
                raise ValueError(f"checkpoint parameter {key} has shape {tuple(value.shape)}, "
                                 f"this model expects {tuple(own[key].shape)}")
        missing = [k for k in own if k not in state]
        decoder_prefixes = ("decoder_", "mask_token")
        missing_encoder = [k for k in missing if not k.startswith(decoder_prefixes)]
        if missing_encoder and strict_encoder:
            raise ValueError(f"checkpoint lacks encoder parameters: {missing_encoder[:8]}"
                             f"{' ...' if len(missing_encoder) > 8 else ''}; nothing was loaded")
        result = self.load_state_dict(state, strict=False)
        missing = list(result.missing_keys)
        missing_decoder = [k for k in missing if k.startswith(decoder_prefixes)]
        if missing_decoder:
            logger.warning("checkpoint has no decoder (%d keys, e.g. %s): the decoder keeps its initialization",
                           len(missing_decoder), missing_decoder[0])
        if result.unexpected_keys:
            logger.warning("checkpoint keys not used by MAEViT: %s", list(result.unexpected_keys)[:8])
        return {"missing_keys": missing, "unexpected_keys": list(result.unexpected_keys), "interpolated": interpolated}


def _preset(name: str) -> Callable[..., MAEViT]:
    description, arguments = PRESETS[name]

    def build(**kwargs) -> MAEViT:
        return MAEViT(**{**arguments, **kwargs})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{description[0].upper()}{description[1:]}. Keyword arguments override the preset's (see MAEViT)."
    return build


mae_vit_tiny_patch16 = _preset("mae_vit_tiny_patch16")
mae_vit_small_patch16 = _preset("mae_vit_small_patch16")
mae_vit_base_patch16 = _preset("mae_vit_base_patch16")
mae_vit_large_patch16 = _preset("mae_vit_large_patch16")
mae_vit_huge_patch14 = _preset("mae_vit_huge_patch14")

MODELS = {name: globals()[name] for name in PRESETS}


def create_model(name: str, **kwargs) -> MAEViT:
    """Build a preset by name (see :data:`MODELS`).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
