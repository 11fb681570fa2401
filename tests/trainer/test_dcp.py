"""DCP checkpoints (``--checkpoint_format dcp``) on one process: exact resume, the rules full checkpoints keep
(atomic folders, rotation, stale temporaries, broken ones passed over), background saves, and every reader."""

import os
from pathlib import Path

import pytest
import torch

import mae_fast.checkpoint as checkpoint
from mae_fast.checkpoint import dcp_problem, load_checkpoint, load_file, read_summary
from mae_fast.errors import CheckpointError, ConfigError, OutputDirError
from mae_fast.pretrain import config_from_args, main
from mae_fast.trainer import MAETrainer
from helpers import tiny_args, write_images


def run(data: Path, out: Path, *extra: str) -> MAETrainer:
    trainer = MAETrainer(config_from_args(tiny_args(data, out, "--checkpoint_format", "dcp", *extra)))
    trainer.fit()
    return trainer


def same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped mid-epoch by --max_steps (3 of 8 steps), its DCP checkpoints, and the images."""
    root = tmp_path_factory.mktemp("dcp")
    data = write_images(root / "data", 16)
    run(data, root / "out", "--max_steps", "3", "--save_last_every", "1")
    return data, root / "out"


def test_a_dcp_checkpoint_resumes_mid_epoch_exactly_and_reads_as_a_full_one(interrupted, tmp_path):
    data, out = interrupted
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-last.dcp",
                                                                                "checkpoint-prev.dcp"]
    assert sorted(os.listdir(out / "checkpoint-last.dcp")) == [".metadata", "__0_0.distcp", "mae_fast.pt"]
    assert read_summary(out / "checkpoint-last.dcp")["step"] == 3
    assert read_summary(out / "checkpoint-prev.dcp")["step"] == 2  # the one before, kept as a full one keeps it
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(out, resumed, symlinks=True)
    trainer = run(data, resumed, "--resume", "auto")
    assert trainer.history[0][0] == 4  # went on from step 3
    whole = run(data, tmp_path / "whole")
    same_weights(trainer.model.state_dict(), whole.model.state_dict())  # bitwise: the resume is exact
    # Every reader takes the folder as it takes a .pth: the whole model under the official keys.
    final = resumed / "checkpoint-last.dcp"
    same_weights(load_file(final)["model"], whole.model.state_dict())
    from mae_fast.model import MAEViT

    model = MAEViT(img_size=32, **__import__("mae_fast.presets", fromlist=["x"]).PRESETS["mae_vit_tiny_patch16"][1])
    model.load_pretrained(final)
    same_weights(model.state_dict(), whole.model.state_dict())
    from mae_fast.export import export

    line = export(final, "official", tmp_path / "official.pth")
    assert "official-layout" in line
    official = torch.load(tmp_path / "official.pth", weights_only=True)
    assert set(official) == {"model"}
    same_weights(official["model"], whole.model.state_dict())
    from mae_fast.finetune import read_encoder_state

    encoder = read_encoder_state(final)
    assert "blocks.0.attn.qkv.weight" in encoder and not any(k.startswith("decoder") for k in encoder)


def test_a_dcp_folder_missing_a_shard_or_truncated_is_named_and_never_resumed_from(interrupted, tmp_path, caplog):
    import shutil

    data, source = interrupted
    out = tmp_path / "out"
    shutil.copytree(source, out)
    last = out / "checkpoint-last.dcp"
    shard = last / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert dcp_problem(last) == f"its shard file __0_0.distcp is truncated ({size // 2} of {size} bytes)"
    assert read_summary(last) is None  # so never named good either
    trainer = MAETrainer(config_from_args(tiny_args(data, out, "--checkpoint_format", "dcp", "--resume", "auto")))
    assert trainer.step == 2 and trainer.last_saved == out / "checkpoint-prev.dcp"
    assert "checkpoint-last.dcp cannot be read" in caplog.text and "truncated" in caplog.text
    shard.unlink()
    assert dcp_problem(last) == "lacks the shard file __0_0.distcp (one rank's part of the checkpoint)"
    with pytest.raises(CheckpointError, match="checkpoint-last.dcp' is incomplete: it lacks the shard file"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match="incomplete"):
        load_file(last)


def test_a_killed_save_leaves_no_folder_under_a_checkpoint_name_and_is_cleaned_up(interrupted, tmp_path, monkeypatch):
    import shutil

    data, source = interrupted
    out = tmp_path / "out"
    shutil.copytree(source, out)
    before = {p.name: read_summary(p)["step"] for p in checkpoint.find_checkpoints(out)}

    def killed(*args, **kwargs):  # the process dies in the middle of the shards' write
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        run(data, out, "--resume", "auto", "--max_steps", "4", "--save_last_every", "1")
    assert {p.name: read_summary(p)["step"] for p in checkpoint.find_checkpoints(out)} == before
    left = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]
    assert left == [".checkpoint-last.dcp.tmp-4"]
    monkeypatch.undo()
    run(data, out, "--resume", "auto", "--max_steps", "4")
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint")]
    assert read_summary(out / "checkpoint-last.dcp")["step"] == 4


def test_publishing_swaps_folders_so_last_and_prev_are_always_complete(tmp_path):
    def folder(name: str, content: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text(content)
        return tmp_path / name

    last, prev = tmp_path / "checkpoint-last.dcp", tmp_path / "checkpoint-prev.dcp"
    checkpoint._publish(folder(".new1", "1"), last, prev)
    assert (last / "x").read_text() == "1" and not prev.exists()
    checkpoint._publish(folder(".new2", "2"), last, prev)
    assert (last / "x").read_text() == "2" and (prev / "x").read_text() == "1"
    checkpoint._publish(folder(".new3", "3"), last, prev)
    assert (last / "x").read_text() == "3" and (prev / "x").read_text() == "2"
    checkpoint._publish(folder(".new4", "4"), last, None)  # the last one was not good: prev stays
    assert (last / "x").read_text() == "4" and (prev / "x").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last.dcp", "checkpoint-prev.dcp"]


def test_background_saves_write_what_synchronous_ones_do_and_the_run_waits_for_the_last(interrupted, tmp_path):
    data, _ = interrupted
    run(data, tmp_path / "sync", "--epochs", "1", "--save_last_every", "1")
    background = run(data, tmp_path / "async", "--epochs", "1", "--async_save", "--save_last_every", "1")
    assert background._pending_save is None  # fit() returned only once the last write was in place
    for name, step in (("checkpoint-last.dcp", 4), ("checkpoint-0.dcp", 4), ("checkpoint-prev.dcp", 3)):
        written = load_file(tmp_path / "async" / name)
        assert written["step"] == step
        # Each background save holds the parameters of its own step, staged before training went on.
        same_weights(written["model"], load_file(tmp_path / "sync" / name)["model"])
    assert not [p for p in (tmp_path / "async").iterdir() if p.name.startswith(".checkpoint")]


def test_a_failing_background_write_stops_the_run_as_a_failed_save_does(interrupted, tmp_path, monkeypatch):
    data, _ = interrupted
    from torch.distributed.checkpoint import FileSystemWriter

    real = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        if "tmp-3" in str(self.path):
            raise OSError(28, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(OutputDirError, match=r"cannot write checkpoint checkpoint-last.dcp in .*No space left on "
                                             r"device; the checkpoints already there are intact"):
        run(data, tmp_path / "out", "--async_save", "--save_last_every", "1")
    assert read_summary(tmp_path / "out" / "checkpoint-last.dcp")["step"] == 2
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".checkpoint")]


@pytest.mark.parametrize("flags, message", [
    (["--fsdp_replicate", "2"], "--fsdp_replicate: needs --fsdp (it replicates FSDP's shards over groups of ranks), "
                                "got 2"),
    (["--fsdp_replicate", "0", "--fsdp"], "--fsdp_replicate: must be a positive integer, got 0"),
    (["--async_save"], "--async_save: writes DCP checkpoints in the background; add --checkpoint_format dcp, got True"),
    (["--checkpoint_format", "zip"], "--checkpoint_format: must be one of"),
])
def test_bad_checkpoint_flags_are_one_line(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_args(tiny_args(tmp_path, tmp_path / "out", *flags))


def test_fsdp_replicate_must_divide_the_ranks_and_dcp_is_fsdps_default(tmp_path, capsys):
    data = write_images(tmp_path / "data", 4)
    assert config_from_args(tiny_args(data, tmp_path / "o", "--fsdp")).checkpoint_format == "dcp"
    assert config_from_args(tiny_args(data, tmp_path / "o")).checkpoint_format == "full"
    assert main(tiny_args(data, tmp_path / "out", "--fsdp", "--fsdp_replicate", "2")) == 2
    assert "--fsdp_replicate: 2 groups do not divide the 1 ranks of this run; give a divisor of 1" in \
        capsys.readouterr().err


def test_resuming_a_dcp_checkpoint_of_another_size_names_both(interrupted, tmp_path):
    data, out = interrupted
    with pytest.raises(CheckpointError, match=r"does not fit this run's model \(--model mae_vit_small_patch16 "
                                              r".*written with --model mae_vit_tiny_patch16"):
        MAETrainer(config_from_args(tiny_args(data, tmp_path / "o", "--model", "mae_vit_small_patch16",
                                              "--checkpoint_format", "dcp", "--resume",
                                              str(out / "checkpoint-last.dcp"))))


def test_a_resume_with_another_batch_per_step_goes_on_at_the_same_image_or_says_why_it_cannot(interrupted, tmp_path):
    data, _ = interrupted
    out = tmp_path / "out"
    run(data, out, "--batch_size", "2", "--max_steps", "3", "--save_last_every", "2")  # 4 and 6 images done
    mid = MAETrainer(config_from_args(tiny_args(data, out, "--resume", str(out / "checkpoint-prev.dcp"))))
    assert (mid.step, mid.epoch, mid.step_in_epoch) == (2, 0, 1)  # 4 images: one batch of 4
    with pytest.raises(CheckpointError, match=r"stopped 6 images into epoch 1 \(1 ranks x --batch_size 2\), which is "
                                              r"not a whole number of this run's batches \(1 ranks x --batch_size 4\)"):
        MAETrainer(config_from_args(tiny_args(data, out, "--resume", "auto")))
