"""Fine-tuning a pretrained MAE encoder for classification, with the official recipe.

This module holds the recipe's parts, usable on their own in any ViT project:
:func:`param_groups_lrd` (layer-wise learning-rate decay, the official signature and result) and
:func:`load_encoder` (a pretraining checkpoint into :class:`mae_fast.vit.VisionTransformer`: the
decoder left out, positions resized, the head initialized as the official script does).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from mae_fast.errors import CheckpointError, ConfigError
from mae_fast.pos_embed import interpolate_pos_embed

logger = logging.getLogger("mae_fast")


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer a ViT parameter belongs to for lr decay: 0 for the embeddings (``cls_token``, ``pos_embed``,
    ``patch_embed.*``), ``i + 1`` for ``blocks.i.*``, ``num_layers`` for everything after the blocks."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(), layer_decay: float = 0.75):
    """Parameter groups with layer-wise lr decay, as the official ``util.lr_decay.param_groups_lrd`` makes them.

    With ``n = len(model.blocks) + 1``, a parameter of layer ``l`` (:func:`layer_id_for_vit`) gets
    ``lr_scale = layer_decay ** (n - l)``: the head 1, the last block ``layer_decay``, the
    embeddings ``layer_decay ** n``. 1-D parameters (biases, norms) and the names in
    ``no_weight_decay_list`` get no weight decay, the others ``weight_decay``. Frozen parameters
    are left out. One group per (layer, decay or not), in the order the parameters first appear;
    each group is ``{"lr_scale", "weight_decay", "params"}``, and the schedule sets a group's lr to
    ``lr * lr_scale``.

    Works on any ViT with ``.blocks`` and timm's names (a timm ``VisionTransformer`` included).
    """
    if not hasattr(model, "blocks"):
        raise ValueError("param_groups_lrd needs a ViT with a .blocks list")
    num_layers = len(model.blocks) + 1
    skip = set(no_weight_decay_list)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in skip
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"lr_scale": layer_decay ** (num_layers - layer),
                           "weight_decay": 0.0 if no_decay else weight_decay, "params": []}
        groups[key]["params"].append(param)
    return list(groups.values())


#: Keys of a pretraining checkpoint that fine-tuning leaves out: the decoder and its mask token.
_DECODER_PREFIXES = ("decoder_", "mask_token")


def read_encoder_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a mae_fast, official or ``.safetensors`` checkpoint (its ``model`` entry), decoder left out.

    Raises:
        CheckpointError: missing, unreadable, not a state dict, or without a ViT encoder.
    """
    from mae_fast.export import read_state

    state, _ = read_state(path)
    state = {k: v for k, v in state.items() if not k.startswith(_DECODER_PREFIXES)}
    if "patch_embed.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        raise CheckpointError(f"{os.fspath(path)!r} holds no ViT encoder (no patch_embed.proj.weight and blocks.*)")
    return state


def _encoder_summary(state: dict[str, torch.Tensor]) -> str:
    proj = state["patch_embed.proj.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return f"a {proj.shape[0]}-wide, {depth}-block encoder with {proj.shape[-1]}-px patches"


def load_encoder(model: nn.Module, checkpoint: str | os.PathLike, flag: str = "--finetune") -> dict:
    """Load a pretrained encoder into a :class:`~mae_fast.vit.VisionTransformer` as the official script does.

    The decoder is left out; ``pos_embed`` is resized (bicubic) to the model's patch grid; a
    ``head`` of another size (a fine-tuned checkpoint with other classes) is dropped. The keys the
    checkpoint lacks and those the model does not use are logged as the official script prints
    them, and the head is then initialized ``trunc_normal(std=2e-5)``.

    Returns:
        ``{"missing_keys": [...], "unexpected_keys": [...]}``.

    Raises:
        CheckpointError: the file cannot be read or holds no encoder.
        ConfigError: the encoder is of another size than the model (both named, with ``flag``), or
            it lacks encoder parameters the model needs.
    """
    state = read_encoder_state(checkpoint)
    own = model.state_dict()
    ours, theirs = _encoder_summary(own), _encoder_summary(state)
    if theirs != ours:
        raise ConfigError(f"{flag}: the checkpoint holds {theirs}, but --model is {ours}; got {os.fspath(checkpoint)!r}")
    for key in ("head.weight", "head.bias"):
        if key in state and (key not in own or state[key].shape != own[key].shape):
            logger.info("Removing key %s from pretrained checkpoint", key)
            del state[key]
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        logger.info("Position interpolate from %s to %s", tuple(state["pos_embed"].shape), tuple(own["pos_embed"].shape))
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        key = mismatched[0]
        raise ConfigError(f"{flag}: checkpoint parameter {key} has shape {tuple(state[key].shape)}, the model "
                          f"expects {tuple(own[key].shape)}")
    result = model.load_state_dict(state, strict=False)
    logger.info("%s", result)  # the official script prints this _IncompatibleKeys line
    allowed = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias"}
    missing_encoder = [k for k in result.missing_keys if k not in allowed]
    if missing_encoder:
        raise ConfigError(f"{flag}: the checkpoint lacks encoder parameters {missing_encoder[:4]}"
                          f"{' ...' if len(missing_encoder) > 4 else ''}; got {os.fspath(checkpoint)!r}")
    if isinstance(model.head, nn.Linear) and "head.weight" in result.missing_keys:
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}
