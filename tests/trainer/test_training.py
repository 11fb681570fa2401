"""Whole runs on the CPU: the demo, resume, a killed run, a non-finite loss, bad checkpoints."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch

from mae_fast.checkpoint import CheckpointError, load_checkpoint
from mae_fast.data import dali_unavailable_reason
from mae_fast.errors import ConfigError
from mae_fast.pretrain import config_from_args, main
from mae_fast.trainer import MAETrainer, NonFiniteLossError
from helpers import STEP_FUSED_OPS, fused_op_runs, profile_fused_ops, tiny_args, write_images


def trained(args):
    trainer = MAETrainer(config_from_args(args))
    trainer.fit()
    return trainer


def test_the_default_command_trains_its_loss_falls_and_the_knn_monitor_rises(tmp_path, caplog):
    # The default run (no --data_path: the built-in set and the demo model and schedule), stopped after its first 5
    # epochs (32 steps each). The kNN monitor runs before training and after epoch 5 (measured: 66.8% -> 96.5%); the
    # loss of the fifth epoch is well below the first's (the quick start's log: 1.156 -> 0.496).
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        assert main(["--output_dir", str(out), "--max_steps", "160", "--num_workers", "0", "--data_backend", "torch",
                     "--log_every", "100"]) == 0
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3, 4]
    assert epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"]
    start = next(r.getMessage() for r in caplog.records if "kNN top-1 at initialization" in r.getMessage())
    initial = float(start.split(": ")[1].split("%")[0]) / 100
    assert epochs[-1]["knn_top1"] > initial + 0.15, (initial, epochs[-1]["knn_top1"])
    assert (out / "checkpoint-last.pth").is_file() and (out / "reconstruction-epoch4.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    state = load_checkpoint(out / "checkpoint-last.pth")
    assert {"model", "optimizer", "scaler", "epoch", "step", "config", "rng"} <= set(state)
    assert "blocks.0.attn.qkv.weight" in state["model"] and state["epoch"] == 4


def test_log_lines_are_plain_lines_when_the_output_is_not_a_terminal(tmp_path, capfd):
    data = write_images(tmp_path / "data", 8)
    assert main(tiny_args(data, tmp_path / "out", "--max_steps", "2")) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err  # no progress bar redrawing itself in a log file
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" (")[0] for line in steps] == ["step 1/2", "step 2/2"]
    assert "images/s" in steps[-1]


def official_lr(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """The official MAE schedule, written out here rather than imported, so that a wrong ``lr_at`` shows."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_lr_follows_the_schedule_each_step_and_accumulation_steps_less_often(tmp_path):
    # Guards against a trainer that does not apply the schedule (lr_at replaced by a constant base_lr passes a check
    # of the last rate alone), that sets it on every batch instead of once per accumulation group, or that steps the
    # optimizer with a rate other than the one set. The rate is recorded at every batch and every optimizer step.
    data = write_images(tmp_path / "data", 10)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / "out", "--batch_size", "2", "--accum_iter", "2",
                                                    "--min_lr", "5e-5")))
    batches, steps = [], []
    train_step = trainer.train_step

    def recording_train_step(images, update, *rest):
        batches.append(([g["lr"] for g in trainer.optimizer.param_groups], update))
        return train_step(images, update, *rest)

    trainer.train_step = recording_train_step
    trainer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append([g["lr"] for g in optimizer.param_groups]))
    trainer.fit()

    # 10 images / batch 2 = 5 batches an epoch; accum 2 -> groups [0, 1], [2, 3], [4]: 3 optimizer steps an epoch.
    assert trainer.step == 6 and trainer.epoch == 2
    assert trainer.effective_batch == 4 and trainer.base_lr == pytest.approx(1e-2 * 4 / 256)
    base_lr, min_lr = trainer.base_lr, 5e-5
    # Each batch runs at the rate of its group's first batch, epoch + batch_index / 5: warmup over epoch 0, cosine
    # over epoch 1.
    expected = [official_lr(epoch + (i - i % 2) / 5, base_lr, min_lr, 1, 2) for epoch in range(2) for i in range(5)]
    assert [0.0, 0.0, 0.4 * base_lr, 0.4 * base_lr] == pytest.approx(expected[:4])
    assert expected[5] == pytest.approx(base_lr)
    assert len(batches) == 10 and [update for _, update in batches] == [False, True, False, True, True] * 2
    for index, (rates, _) in enumerate(batches):  # both parameter groups, decay and no decay
        assert rates == pytest.approx([expected[index]] * 2, rel=1e-12, abs=0.0), f"batch {index}"
    # The optimizer steps at the end of each group, at the rate the group started with.
    assert len(steps) == 6
    for index, rates in zip([1, 3, 4, 6, 8, 9], steps):
        assert rates == pytest.approx([expected[index]] * 2, rel=1e-12, abs=0.0), f"step at batch {index}"
    assert trainer.lr == pytest.approx(official_lr(1.8, base_lr, min_lr, 1, 2), rel=1e-12)


def test_resume_continues_the_same_run(tmp_path):
    data = write_images(tmp_path / "data", 16)
    straight = trained(tiny_args(data, tmp_path / "straight", "--max_steps", "6"))
    first = trained(tiny_args(data, tmp_path / "split", "--max_steps", "3"))
    assert first.step == 3 and (tmp_path / "split" / "checkpoint-last.pth").is_file()
    second = trained(tiny_args(data, tmp_path / "split", "--max_steps", "6", "--resume", "auto"))
    assert second.step == 6
    assert [s for s, _ in second.history] == [4, 5, 6]
    joined = first.history + second.history
    assert [s for s, _ in joined] == [s for s, _ in straight.history]
    assert [v for _, v in joined] == pytest.approx([v for _, v in straight.history], rel=1e-6)
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_the_epoch_mean_in_log_txt_after_a_mid_epoch_resume_is_the_uninterrupted_runs(tmp_path):
    data = write_images(tmp_path / "data", 16)  # 4 batches an epoch
    trained(tiny_args(data, tmp_path / "straight", "--log_every", "100"))
    trained(tiny_args(data, tmp_path / "split", "--log_every", "100", "--max_steps", "3"))  # stops in epoch 0
    trained(tiny_args(data, tmp_path / "split", "--log_every", "100", "--resume", "auto"))

    def epoch_lines(out):
        return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]

    straight, split = epoch_lines(tmp_path / "straight"), epoch_lines(tmp_path / "split")
    assert [e["epoch"] for e in split] == [0, 1]
    assert [e["train_loss"] for e in split] == pytest.approx([e["train_loss"] for e in straight], rel=1e-6)


@pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
def test_a_dali_run_resumed_mid_epoch_trains_like_one_run(tmp_path):
    # The resumed run's pipeline is new: its crops and flips still follow each slot's seed.
    data = write_images(tmp_path / "data", 16)
    dali = ("--data_backend", "dali", "--log_every", "1")
    straight = trained(tiny_args(data, tmp_path / "straight", *dali, "--max_steps", "6"))
    first = trained(tiny_args(data, tmp_path / "split", *dali, "--max_steps", "3"))  # stops inside epoch 0
    second = trained(tiny_args(data, tmp_path / "split", *dali, "--max_steps", "6", "--resume", "auto"))
    joined = first.history + second.history
    assert [v for _, v in joined] == pytest.approx([v for _, v in straight.history], rel=1e-6)


def test_a_prepared_shard_set_trains_and_resumes_mid_epoch_like_one_run(tmp_path):
    from mae_fast.prepare import prepare
    data = write_images(tmp_path / "data", 16)
    shards = tmp_path / "shards"
    prepare(str(data), str(shards), max_side=40, shard_size=8_000, workers=1)
    assert len(list(shards.glob("shard-*.tar"))) >= 2
    straight = trained(tiny_args(shards, tmp_path / "straight", "--max_steps", "6"))
    first = trained(tiny_args(shards, tmp_path / "split", "--max_steps", "3"))  # stops inside epoch 0 (4 steps)
    second = trained(tiny_args(shards, tmp_path / "split", "--max_steps", "6", "--resume", "auto"))
    assert straight.loader.num_samples == 16 and [s for s, _ in second.history] == [4, 5, 6]
    joined = first.history + second.history
    assert [v for _, v in joined] == pytest.approx([v for _, v in straight.history], rel=1e-6)


def test_a_killed_run_resumes_from_the_rolling_checkpoint(tmp_path):
    data = write_images(tmp_path / "data", 32)
    out = tmp_path / "out"
    args = tiny_args(data, out, "--epochs", "50", "--save_last_every", "2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.pretrain", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = out / "checkpoint-last.pth"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not (last.is_file() and load_checkpoint(last)["step"] >= 6):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved_step = load_checkpoint(last)["step"]
    assert saved_step >= 6 and saved_step % 2 == 0
    resumed = MAETrainer(config_from_args(tiny_args(data, out, "--epochs", "50", "--resume", "auto",
                                                    "--max_steps", str(saved_step + 2))))
    assert resumed.step == saved_step and resumed.last_saved == last
    resumed.fit()
    assert resumed.step == saved_step + 2


def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", 16)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / "out", "--save_last_every", "1", "--log_every", "100")))
    calls = {"n": 0}
    real_loss = type(trainer.model).forward_loss

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = real_loss(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(type(trainer.model), "forward_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 3 .*before the loss left its normal range is "
                                                 r".*checkpoint-prev.pth"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "out" / "checkpoint-last.pth")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert load_checkpoint(tmp_path / "out" / "checkpoint-prev.pth")["step"] == 1


def test_bad_checkpoints_give_clear_errors(tmp_path):
    data = write_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    trained(tiny_args(data, out, "--max_steps", "1"))
    good = out / "checkpoint-last.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="it is not a checkpoint, or it is truncated"):
        MAETrainer(config_from_args(tiny_args(data, out, "--resume", str(truncated))))
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a mae_fast training checkpoint .*load_pretrained"):
        MAETrainer(config_from_args(tiny_args(data, out, "--resume", str(foreign))))
    with pytest.raises(CheckpointError, match="does not exist"):
        MAETrainer(config_from_args(tiny_args(data, out, "--resume", str(tmp_path / "missing.pth"))))
    with pytest.raises(CheckpointError, match="does not fit this run's model"):
        MAETrainer(config_from_args(tiny_args(data, out, "--resume", str(good), "--model", "mae_vit_small_patch16")))
    pickled = tmp_path / "pickled.pth"
    torch.save({**load_checkpoint(good), "extra": Fraction(1, 3)}, pickled)  # an object the safe loader refuses
    with pytest.raises(CheckpointError, match="contains objects that are not plain tensors; refusing to unpickle it"):
        load_checkpoint(pickled)
    for field, value in (("epoch", "abc"), ("step", -1), ("step_in_epoch", 1.5), ("optimizer", [1])):
        damaged = tmp_path / f"damaged-{field}.pth"
        torch.save({**load_checkpoint(good), field: value, "format": "mae_fast-checkpoint-v1"}, damaged)
        with pytest.raises(CheckpointError, match=f"is damaged: its '{field}' is"):
            MAETrainer(config_from_args(tiny_args(data, out, "--resume", str(damaged))))


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    data = write_images(tmp_path / "data", 8)
    eager = trained(tiny_args(data, tmp_path / "eager", "--max_steps", "2"))
    compiled = trained(tiny_args(data, tmp_path / "compiled", "--max_steps", "2", "--compile"))
    assert compiled.train_model is not compiled.model  # the step ran through torch.compile
    assert [v for _, v in compiled.history] == pytest.approx([v for _, v in eager.history], rel=1e-4)
    regional = trained(tiny_args(data, tmp_path / "blocks", "--max_steps", "2", "--compile", "--compile_scope",
                                 "blocks"))
    blocks = [*regional.model.blocks, *regional.model.decoder_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)  # each block runs compiled
    assert regional.train_model is regional.model
    assert list(regional.model.state_dict()) == list(eager.model.state_dict())  # checkpoint keys unchanged
    assert "compiled (blocks)" in regional.describe()
    assert [v for _, v in regional.history] == pytest.approx([v for _, v in eager.history], rel=1e-4)


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    data = write_images(tmp_path / "data", 8)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / "empty", "--resume", "auto")))
    assert trainer.step == 0 and trainer.last_saved is None


def test_validation_writes_loss_and_reconstructions(tmp_path):
    data = write_images(tmp_path / "data", 8)
    val = write_images(tmp_path / "val", 5)
    trainer = trained(tiny_args(data, tmp_path / "out", "--val_path", str(val), "--epochs", "1", "--norm_pix_loss"))
    line = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[-1])
    assert line["val_loss"] > 0 and (tmp_path / "out" / "reconstruction-epoch0.png").is_file()
    assert trainer.val_loader.num_samples == 5


def test_apex_optimizer_without_apex_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import apex  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    data = write_images(tmp_path / "data", 8)
    with pytest.raises(ConfigError, match="--optimizer: apex needs NVIDIA apex"):
        MAETrainer(config_from_args(tiny_args(data, tmp_path / "out", "--optimizer", "apex")))


def test_the_profile_shows_which_fused_ops_each_step_ran(tmp_path):
    # The mechanism of the GPU test below, checked where it can be: with --kernel_backend triton (interpreted on a
    # CPU) the profile counts each fused op once per step, forward and backward; with the torch reference, never.
    from mae_fast.ops import dispatch
    reason = dispatch._why_not("triton", [torch.zeros(1)])
    if reason:
        pytest.skip(f"Triton cannot run here: {reason}")
    data = write_images(tmp_path / "data", 16)  # 4 batches an epoch: 2 steps stop inside it, no evaluation forward
    runs = {}
    for backend in ("triton", "torch"):
        trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / backend, "--max_steps", "2",
                                                        "--kernel_backend", backend)))
        runs[backend] = fused_op_runs(*profile_fused_ops(trainer.fit))
    assert runs["triton"] == {op: {"forward": 2, "backward": 2 if backward else 0, "gpu_kernels": 0}
                              for op, (backward, _) in STEP_FUSED_OPS.items()}
    assert runs["torch"] == {op: {"forward": 0, "backward": 0, "gpu_kernels": 0} for op in STEP_FUSED_OPS}


@pytest.mark.gpu
def test_gpu_bf16_training_with_fused_kernels(tmp_path):
    # What ran, from a profile of the run (describe() only says what dispatch would choose): every step called each
    # fused op on its Triton or CUDA backend, forward and backward, and GPU kernels named after it were launched.
    data = write_images(tmp_path / "data", 32)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / "out", "--device", "cuda", "--epochs", "4",
                                                    "--norm_pix_loss")))
    ops, kernels = profile_fused_ops(trainer.fit)
    assert trainer.precision == "bf16" and trainer.optimizer.defaults["fused"]
    losses = [v for _, v in trainer.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    steps = trainer.step
    assert steps == 32  # 8 batches an epoch, 4 epochs
    runs = fused_op_runs(ops, kernels)
    for op, (backward, _) in STEP_FUSED_OPS.items():
        run = runs[op]
        assert run["forward"] >= steps and run["backward"] == (steps if backward else 0), (op, run, dict(ops))
        assert run["gpu_kernels"] >= run["forward"] + run["backward"], (op, run, sorted(kernels))
