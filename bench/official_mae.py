"""The official MAE forward written plainly (full patch embedding, gather-based masking, torch.cat):
the plain-PyTorch baseline of the training-step benchmark. Same parameters as :class:`MAEViT`."""

from __future__ import annotations

import torch

from mae_fast import MAEViT


def official_forward(model: MAEViT, imgs: torch.Tensor, mask_ratio: float = 0.75):
    """``MaskedAutoencoderViT.forward`` of the official code, on an MAEViT's parameters."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (model.cls_token + model.pos_embed[:, :1, :]).expand(N, -1, -1)
    x = torch.cat((cls, x), dim=1)
    for blk in model.blocks:
        x = blk(x)
    x = model.decoder_embed(model.norm(x))
    mask_tokens = model.mask_token.repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]
    target = model.patchify(imgs)
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()
