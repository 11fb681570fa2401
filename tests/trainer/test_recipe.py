"""The official recipe: learning-rate scaling and schedule, weight-decay groups, optimizer."""

import math

import pytest
import torch

from mae_fast import create_model
from mae_fast.trainer import lr_at, param_groups


def official_adjust_learning_rate(epoch, lr, min_lr, warmup_epochs, epochs):
    """util/lr_sched.py of the official MAE code."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


@pytest.mark.parametrize("epoch", [0.0, 0.37, 12.5, 39.99, 40.0, 41.3, 200.0, 399.99])
def test_schedule_is_the_official_formula(epoch):
    assert lr_at(epoch, 2.4e-3, 1e-6, 40, 400) == pytest.approx(official_adjust_learning_rate(epoch, 2.4e-3, 1e-6, 40, 400),
                                                                 rel=1e-12, abs=1e-15)


def test_weight_decay_groups():
    model = create_model("mae_vit_tiny_patch16", img_size=32)
    no_decay, decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    for p in no_decay["params"]:
        assert p.ndim <= 1 or names[id(p)].endswith(".bias")
    for p in decay["params"]:
        assert p.ndim > 1 and not names[id(p)].endswith(".bias")
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= decayed
    in_optimizer = {id(p) for g in (no_decay, decay) for p in g["params"]}
    assert id(model.pos_embed) not in in_optimizer and id(model.decoder_pos_embed) not in in_optimizer
    assert len(in_optimizer) == sum(1 for p in model.parameters() if p.requires_grad)
