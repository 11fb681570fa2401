"""FineTuner: fine-tuning a pretrained MAE encoder for classification with the official recipe, a task of the run
engine (:mod:`mae_fast.engine`); the command is :mod:`mae_fast.finetune`.

This module also holds the recipe's parts, usable on their own in any ViT project (and importable from
:mod:`mae_fast.finetune` as well):
:func:`param_groups_lrd` (layer-wise learning-rate decay, the official signature and result) and
:func:`load_encoder` (a pretraining checkpoint into :class:`mae_fast.vit.VisionTransformer`: the
decoder left out, positions resized, the head initialized as the official script does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mae_fast.engine import Engine
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
    if isinstance(model.head, nn.Linear):  # always, as the official script does after loading
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}


# ---------------------------------------------------------------------------------------------- the task


def build_mixup(aug, num_classes: int):
    """timm's ``Mixup`` as the official script builds it, or None when mixup and cutmix are off."""
    if not aug.mixup_active:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, cutmix_minmax=aug.cutmix_minmax, prob=aug.mixup_prob,
                 switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode, label_smoothing=aug.smoothing,
                 num_classes=num_classes)


def build_criterion(aug) -> nn.Module:
    """The official choice: soft-target cross-entropy under mixup (its targets carry the smoothing), else
    label-smoothing cross-entropy, else plain cross-entropy (timm's losses)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if aug.mixup_active:
        return SoftTargetCrossEntropy()
    if aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug.smoothing)
    return nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device, autocast, distributed: bool) -> dict:
    """Top-1, top-5 (in percent) and mean cross-entropy over every image ``loader`` deals, as the official
    ``engine_finetune.evaluate`` reports them, but weighted per image, so that the figures do not depend on how the
    set is split into batches or ranks: ``--dist_eval`` over N ranks gives the one-rank figures (marked slots,
    the padding of the last batch included, are never counted).

    ``loader.epoch(0)`` yields ``(images, labels, indices)``.

    Returns:
        ``{"acc1", "acc5", "loss", "count"}``.
    """
    from mae_fast.distributed import all_reduce_sum

    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels, indices in loader.epoch(0):
        keep = (indices >= 0).to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.double()  # B x classes: cheap, and the per-image losses then do not depend on the batching
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        losses = nn.functional.cross_entropy(logits, safe, reduction="none")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == safe[:, None]
        totals += torch.stack([(hit[:, 0] & keep).sum(), (hit.any(dim=1) & keep).sum(), (losses * keep).sum(),
                               keep.sum()]).double()
    if distributed:
        totals = all_reduce_sum(totals)
    correct1, correct5, loss_sum, count = totals.tolist()
    if was_training:
        model.train()
    count = max(count, 1.0)
    return {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "count": int(count)}


class FineTuner(Engine):
    """Fine-tunes a pretrained MAE encoder for classification as ``config`` (a
    :class:`~mae_fast.config.FinetuneConfig`) describes, with the official recipe; ``fit()`` runs it.

    What it supplies to the engine: the :class:`~mae_fast.vit.VisionTransformer` (its encoder from
    ``--finetune``), the labeled loaders, the layer-decay parameter groups
    (:func:`param_groups_lrd`), the step's loss (timm's mixup/cutmix on the device batch, then the
    official criterion), and the evaluation (:func:`evaluate_classifier`) with the official line
    ``* Acc@1 .. Acc@5 .. loss ..`` and the official keys in ``log.txt``.
    """

    betas = (0.9, 0.999)  # the official fine-tuning's AdamW keeps PyTorch's betas

    def build_loaders(self):
        from mae_fast.data import build_classification_loader

        cfg, rank, world = self.config, self.dist.rank, self.dist.world_size
        data = cfg.data
        if cfg.is_demo:  # the built-in set: train/<class>/ and val/<class>/
            from mae_fast.data.builtin import builtin_image_dir

            data = dataclasses.replace(data, data_path=str(builtin_image_dir(data.builtin_count, data.builtin_size)))
        loader = build_classification_loader(data, cfg.aug, rank, world, self.device, cfg.seed, train=True)
        # Without --dist_eval every rank evaluates the whole set (as the official script does); the figures are the
        # same either way.
        eval_rank, eval_world = (rank, world) if cfg.dist_eval else (0, 1)
        val_loader = build_classification_loader(data, None, eval_rank, eval_world, self.device, cfg.seed,
                                                 train=False)
        classes = len(loader.classes)
        if cfg.model.nb_classes is None:
            cfg.model.nb_classes = classes
        elif cfg.model.nb_classes != classes:
            raise ConfigError(f"--nb_classes: the training data has {classes} classes, not {cfg.model.nb_classes}, "
                              f"got {cfg.model.nb_classes}")
        if classes < 2 and cfg.aug.mixup_active:
            raise ConfigError(f"--mixup/--cutmix: mixing needs at least two classes; the training data has {classes}")
        if len(val_loader.classes) != classes:
            raise ConfigError(f"--val_path: the validation data has {len(val_loader.classes)} classes, the training "
                              f"data {classes}")
        return loader, val_loader

    def build_model(self) -> nn.Module:
        from mae_fast.vit import create_vit

        mcfg = self.config.model
        model = create_vit(mcfg.name, img_size=self.config.data.input_size, num_classes=mcfg.nb_classes,
                           global_pool=mcfg.global_pool, drop_path_rate=mcfg.drop_path,
                           attn_backend=mcfg.attn_backend, grad_checkpointing=mcfg.grad_checkpointing)
        if mcfg.finetune and not self.config.eval:
            loaded = load_encoder(model, mcfg.finetune)
            if self.dist.is_main:
                logger.info("loaded the pretrained encoder of %s (%d keys left at their initialization: %s)",
                            mcfg.finetune, len(loaded["missing_keys"]), ", ".join(loaded["missing_keys"]))
        return model

    def setup_task(self) -> None:
        # timm's Mixup draws from numpy's global generator: seeded per rank as the official script seeds it, and kept
        # in checkpoints (task_rng_state) so that a resumed run mixes as the uninterrupted one.
        np.random.seed(self.config.seed + self.dist.rank)
        self.mixup = build_mixup(self.config.aug, self.config.model.nb_classes)
        self.criterion = build_criterion(self.config.aug)
        self.max_accuracy = 0.0

    def task_rng_state(self) -> dict:
        state = np.random.get_state(legacy=False)
        return {"numpy": {"key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
                          "pos": state["state"]["pos"], "has_gauss": state["has_gauss"], "gauss": state["gauss"]}}

    def load_task_rng_state(self, rng: dict) -> None:
        saved = rng.get("numpy")
        if saved:
            np.random.set_state({"bit_generator": "MT19937", "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
                                 "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}})

    def param_groups(self, model: nn.Module) -> list[dict]:
        return param_groups_lrd(model, self.config.optim.weight_decay, model.no_weight_decay(),
                                self.config.optim.layer_decay)

    def step_loss(self, inputs, weights: torch.Tensor, all_valid: bool) -> torch.Tensor:
        images, labels = inputs
        if not all_valid:  # marked slots (label -1) take part in the mixing with label 0, then leave the loss
            labels = torch.where(weights > 0, labels, torch.zeros_like(labels))
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = self.train_model(images).float()
        if all_valid:  # nearly every batch: the criterion as it is
            return self.criterion(logits, targets)
        rows = (weights > 0).nonzero()[:, 0]  # a rare batch with marked slots: one synchronization
        return self.criterion(logits[rows], targets[rows]) if rows.numel() else logits.sum() * 0.0

    def evaluate(self) -> dict:
        stats = evaluate_classifier(self.train_model, self.val_loader, self.device, self._autocast(),
                                    distributed=self.config.dist_eval and self.dist.distributed)
        self.max_accuracy = max(self.max_accuracy, stats["acc1"])
        if self.dist.is_main:
            print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}", flush=True)
            logger.info("Accuracy of the network on the %d test images: %.1f%%; max accuracy: %.2f%%", stats["count"],
                        stats["acc1"], self.max_accuracy)
            if self.writer is not None:
                for key in ("acc1", "acc5", "loss"):
                    self.writer.add_scalar(f"perf/test_{key}", stats[key], self.epoch)
        return {f"test_{key}": stats[key] for key in ("acc1", "acc5", "loss")}

    def log_line(self, stats: dict, epoch: int) -> dict:
        line = {key: stats[key] for key in ("train_lr", "train_loss") if key in stats}
        line.update({key: value for key, value in stats.items() if key.startswith("test_")})
        return {**line, "epoch": epoch, "n_parameters": sum(p.numel() for p in self.model.parameters()
                                                             if p.requires_grad)}

    def flops_per_image(self) -> float:
        return self.model.flops_per_image()

    def describe_model(self) -> str:
        mcfg = self.config.model
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        source = f"from {mcfg.finetune}" if mcfg.finetune else "from random initialization"
        return (f"model {mcfg.name} ({trainable:,} trainable parameters, {self.config.data.input_size}px, "
                f"{mcfg.nb_classes} classes, {'global pool' if mcfg.global_pool else 'cls token'}, drop path "
                f"{mcfg.drop_path:g}, layer decay {self.config.optim.layer_decay:g}) {source}")

    def _refuse_pretraining_checkpoint(self, path: Path) -> None:
        """Raise the --finetune hint when ``path`` is a readable pretraining checkpoint; otherwise return."""
        if self.config.resume == "auto" or not (path.is_file() or path.is_dir()):
            return
        from mae_fast.export import read_state

        try:
            state, _ = read_state(path)
        except CheckpointError:
            return
        self.check_resume_state(path, {"model": state})

    def check_resume_state(self, path, state: dict) -> None:
        model_state = state.get("model", {})
        if any(key.startswith(_DECODER_PREFIXES) for key in model_state) or "head.weight" not in model_state:
            raise CheckpointError(f"--resume: {str(path)!r} is a pretraining checkpoint (it has no classification "
                                  f"head); start fine-tuning from it with --finetune {path}")

    def _resume(self) -> None:
        if not self.config.eval:
            try:
                super()._resume()
            except CheckpointError:
                # A pretraining checkpoint in another layout (an official one holds only "model") is named as such.
                self._refuse_pretraining_checkpoint(Path(self.config.resume))
                raise
            return
        # --eval: the model's weights alone, from a mae_fast or official fine-tuned checkpoint (which has no
        # optimizer state; official ones hold only "model").
        from mae_fast.export import read_state

        path = Path(self.config.resume)
        model_state, written_with = read_state(path)  # mae_fast's, an official one, or .safetensors
        self.check_resume_state(path, {"model": model_state})
        self._check_fits(path, model_state, {"model": {"name": written_with}} if written_with else None)
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, model_state, options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(model_state)
        self.last_saved = path

    def run_eval(self) -> dict:
        """``--eval``: evaluate the ``--resume`` checkpoint, print the official line, append the figures to
        ``log.txt``; returns them (``test_acc1``, ``test_acc5``, ``test_loss``)."""
        stats = self.evaluate()
        if self.dist.is_main:
            self._append_log_line(stats)
        if self.writer is not None:
            self.writer.flush()
        return stats
