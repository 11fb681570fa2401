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


def test_log_txt_train_lr_is_the_epochs_mean_of_the_rate_each_batch_ran_at(tmp_path, monkeypatch):
    # The official metric logger records the rate at every batch (accumulation batches too) and logs their mean.
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_args, write_images
    from mae_fast.pretrain import config_from_args
    from mae_fast.trainer import MAETrainer

    data = write_images(tmp_path / "data", 16)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / "out", "--batch_size", "2", "--accum_iter", "2",
                                                    "--log_every", "3")))
    ran_at: list[float] = []
    real_step = trainer.train_step

    def recording(inputs, update, valid=None):
        ran_at.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step(inputs, update, valid)

    monkeypatch.setattr(trainer, "train_step", recording)
    trainer.fit()
    logged = [json.loads(line)["train_lr"] for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert len(ran_at) == 16 and len(set(ran_at[:8])) == 4  # 8 batches an epoch, the rate set every 2
    assert logged == pytest.approx([sum(ran_at[:8]) / 8, sum(ran_at[8:]) / 8], rel=1e-12)
