"""What a user sees: one line per mistake, flags that cannot train refused, --help, progress lines, the PNG."""

import logging
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.config import DataConfig, default_num_workers
from mae_fast.data.torch_loader import TorchLoader
from mae_fast.model import MODELS, PRESETS, create_model
from mae_fast.pretrain import build_parser, config_from_args, main, resume_command
from mae_fast.trainer import MAETrainer, RECONSTRUCTION_COLUMNS, reconstruction_grid
from helpers import tiny_args, write_images


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("mae_fast.pretrain: error: ")
    return lines[0]


def test_a_bad_input_size_names_the_flag_and_valid_values(tmp_path, capsys):
    data = write_images(tmp_path / "data", 4)
    assert main(tiny_args(data, tmp_path / "out", "--input_size", "40")) == 2
    line = one_error_line(capsys)
    assert "--input_size" in line and "patch size 16" in line and "for example 32 or 48" in line and "got 40" in line
    assert main(tiny_args(data, tmp_path / "out", "--input_size", "40", "--model", "mae_vit_huge_patch14")) == 2
    assert "for example 28 or 42" in one_error_line(capsys)


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys):
    data = write_images(tmp_path / "data", 4)
    out = tmp_path / "out"
    assert main(tiny_args(data, out, "--max_steps", "1")) == 0
    capsys.readouterr()
    assert main(tiny_args(data, out, "--resume", "auto", "--model", "mae_vit_small_patch16")) == 2
    assert "does not fit this run's model" in one_error_line(capsys)


def test_data_folder_problems_are_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(tiny_args(empty, tmp_path / "out")) == 2
    assert "holds no image files" in one_error_line(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    assert main(tiny_args(broken, tmp_path / "out")) == 2
    assert "none of its 1 image files can be read" in one_error_line(capsys)


def test_a_backend_that_cannot_run_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the cuda kernel backend can run here")
    data = write_images(tmp_path / "data", 4)
    assert main(tiny_args(data, tmp_path / "out", "--kernel_backend", "cuda", "--max_steps", "1")) == 2
    assert "backend='cuda' cannot run" in one_error_line(capsys)
    assert main(tiny_args(data, tmp_path / "out", "--device", "cuda")) == 2
    assert "--device: no CUDA GPU" in one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from mae_fast.errors import DataError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        main(tiny_args(empty, tmp_path / "out", "--debug"))
    monkeypatch.setenv("MAE_FAST_DEBUG", "1")
    with pytest.raises(DataError):
        main(tiny_args(empty, tmp_path / "out"))


@pytest.mark.parametrize("argv,message", [
    (["--mask_ratio", "0"], r"--mask_ratio: must be in \(0, 1\): with no patch removed the loss is 0"),
    (["--lr", "nan"], "--lr: must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number >= 0, got inf"),
    (["--weight_decay", "inf"], "--weight_decay: must be a finite number >= 0, got inf"),
    (["--weight_decay", "nan"], "--weight_decay: must be a finite number >= 0, got nan"),
    (["--lr", "0.001", "--min_lr", "0.01"], "--min_lr: must not exceed the peak learning rate --lr 0.001, got 0.01"),
    (["--epochs", "5", "--start_epoch", "5"], "--start_epoch: must be below --epochs 5 .*got 5"),
    (["--loss_spike_factor", "0.5"], "--loss_spike_factor: must be above 1"),
    (["--dist_timeout", "0"], "--dist_timeout: must be a positive number of seconds"),
])
def test_flags_that_cannot_train_are_refused(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        config_from_args(argv)
    assert main(argv) == 2
    one_error_line(capsys)


def test_min_lr_above_the_derived_peak_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    data = write_images(tmp_path / "data", 4)
    built = []
    monkeypatch.setattr("mae_fast.trainer.create_model", lambda *a, **k: built.append(1))
    # blr 1e-2 x effective batch 4 / 256 = 1.5625e-4
    assert main(tiny_args(data, tmp_path / "out", "--min_lr", "0.001")) == 2
    line = one_error_line(capsys)
    assert "--min_lr: must not exceed the peak learning rate 0.00015625 (--blr 0.01 x effective batch 4 / 256)" in line
    assert not built


def test_warmup_not_below_epochs_warns_once(tmp_path, caplog):
    data = write_images(tmp_path / "data", 4)
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        MAETrainer(config_from_args(tiny_args(data, tmp_path / "out", "--epochs", "2", "--warmup_epochs", "3")))
    found = [r for r in caplog.records if "--warmup_epochs" in r.getMessage()]
    assert len(found) == 1 and "never reaches its peak" in found[0].getMessage()


def test_num_workers_defaults_to_what_the_machine_can_use(monkeypatch, tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert DataConfig().num_workers == max(1, min(10, cores)) == default_num_workers()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert DataConfig().num_workers == max(1, min(10, cores // 4))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    write_images(tmp_path / "data", 4)
    files = sorted(str(p) for p in (tmp_path / "data").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch warns when the workers exceed the cores
        TorchLoader(files, 16, 2, 0, 1, torch.device("cpu"), 0, DataConfig().num_workers)


def test_help_shows_every_default_and_the_presets_without_markup(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and ":func:" not in text
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "local_rank", "debug"):
            assert "default" in action.help or "unset" in action.help, action.dest
    for name in MODELS:
        assert name in text
    assert "(default: 0.75)" in text and "(default: off)" in text and "(default: 900)" in text


def test_resume_command_keeps_the_flags_and_the_launcher(monkeypatch):
    argv = ["--data_path", "d", "--resume", "old.pth", "--lr", "0.1", "--resume=other", "--local_rank=0"]
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resume_command(argv, "auto") == "python -m mae_fast.pretrain --data_path d --lr 0.1 --resume auto"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resume_command(["--x", "a b"], "c.pth").startswith("torchrun --standalone --nproc_per_node=8 -m ")
    assert resume_command(["--x", "a b"], "c.pth").endswith("--x 'a b' --resume c.pth")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert resume_command([], "auto").startswith("torchrun <the same torchrun flags> -m mae_fast.pretrain")


def test_progress_lines_count_steps_of_the_run_with_an_eta_and_each_epoch_ends_with_a_summary(tmp_path, capfd):
    data = write_images(tmp_path / "data", 12)
    out = tmp_path / "out"
    # 12 images / batch 4 = 3 batches an epoch, accumulation 2 -> 2 steps an epoch, 3 epochs -> 6 steps.
    assert main(tiny_args(data, out, "--epochs", "3", "--accum_iter", "2", "--save_every", "2")) == 0
    lines = capfd.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" (")[0] for line in steps] == [f"step {n}/6" for n in range(1, 7)]
    assert all(" ETA " in line and "images/s" in line for line in steps)
    assert "(epoch 1/3, batch 2/3)" in steps[0]
    summaries = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" done")[0] for line in summaries] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("mean loss" in line and "images/s" in line for line in summaries)
    assert summaries[0].endswith(f"saved {out / 'checkpoint-last.pth'}")
    assert summaries[1].endswith(f"saved {out / 'checkpoint-1.pth'}, {out / 'checkpoint-last.pth'}")


def test_the_step_reads_like_the_algorithm(tmp_path):
    data = write_images(tmp_path / "data", 4)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / "out")))
    images, _ = next(iter(trainer.loader.epoch(0)))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.train_step(images, update=False)  # forward and backward only: the weights stay
    assert loss.ndim == 0 and not loss.requires_grad and trainer.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    trainer.train_step(images, update=True)  # and the optimizer step
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())


def test_the_reconstruction_png_labels_its_four_columns(tmp_path):
    model = create_model("mae_vit_tiny_patch16", img_size=64, kernel_backend="torch")
    images = torch.randn(2, 3, 64, 64)
    _, pred, mask = model(images, mask_ratio=0.75)
    grid = reconstruction_grid(model, images, pred.detach(), mask)
    width = 128  # 64-px images are enlarged twice, so the labels fit
    header = grid.shape[1] - 2 * width
    assert grid.shape == (3, header + 2 * width, 4 * width) and header >= 8
    top = grid[:, :header]
    for column in range(4):
        ink = (top[:, :, column * width:(column + 1) * width] < 0.5).all(dim=0).sum().item()
        assert ink > 10, (RECONSTRUCTION_COLUMNS[column], ink)  # dark text drawn over every column
    assert RECONSTRUCTION_COLUMNS == ("original", "masked input", "prediction", "prediction + visible")


def test_a_run_writes_the_labelled_png(tmp_path):
    data = write_images(tmp_path / "data", 4)
    main(tiny_args(data, tmp_path / "out", "--epochs", "1"))
    with Image.open(tmp_path / "out" / "reconstruction-epoch0.png") as png:
        array = np.asarray(png)
    assert array.shape[1] == 4 * 96 and array.shape[0] > 4 * 96  # 32-px images enlarged 3x, the header above
    assert (array[:4] == 255).all()  # the white header band starts the image


def test_presets_are_described_once():
    assert set(PRESETS) == set(MODELS)
    assert MODELS["mae_vit_base_patch16"].__doc__.startswith("Official mae_vit_base_patch16_dec512d8b")


def test_messages_count_epochs_and_batches_from_1_and_files_keep_the_official_names(tmp_path, caplog, monkeypatch):
    import tqdm

    data = write_images(tmp_path / "data", 16)  # 4 batches an epoch
    out = tmp_path / "out"
    assert main(tiny_args(data, out, "--max_steps", "3", "--log_every", "100")) == 0
    bars = []
    real_bar = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: bars.append(k["desc"]) or real_bar(*a, **k))
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        assert main(tiny_args(data, out, "--log_every", "100", "--resume", "auto")) == 0
        assert "at step 3 (epoch 1/2, batch 3/4)" in caplog.text  # three batches of the first epoch done
        assert bars == ["epoch 1/2", "epoch 2/2"]
        caplog.clear()
        assert main(tiny_args(data, out, "--log_every", "100", "--resume", "auto")) == 0
        assert "at step 8 (epoch 2/2 done)" in caplog.text
    # Files keep the official 0-based names: the second (last) epoch is checkpoint-1.pth.
    assert (out / "checkpoint-1.pth").is_file() and (out / "reconstruction-epoch1.png").is_file()
    assert not (out / "checkpoint-2.pth").exists()


def test_bytes_that_are_not_a_checkpoint_are_called_so(tmp_path, capsys):
    data = write_images(tmp_path / "data", 4)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint at all")
    for path in (junk, text):
        assert main(tiny_args(data, tmp_path / "out", "--resume", str(path))) == 2
        line = one_error_line(capsys)
        assert f"cannot read checkpoint {str(path)!r}: it is not a checkpoint" in line
        assert "weights_only" not in line and "plain tensors" not in line


def test_a_checkpoint_of_another_model_names_the_first_mismatched_keys_and_shapes(tmp_path, capsys):
    data = write_images(tmp_path / "data", 4)
    out = tmp_path / "out"
    assert main(tiny_args(data, out, "--max_steps", "1")) == 0
    capsys.readouterr()
    assert main(tiny_args(data, out, "--resume", "auto", "--model", "mae_vit_small_patch16")) == 2
    line = one_error_line(capsys)
    assert "does not fit this run's model" in line and "Error(s) in loading" not in line
    assert "cls_token is [1, 1, 192] in the checkpoint, [1, 1, 384] here" in line
    assert "--model mae_vit_tiny_patch16" in line  # what it was written by
    assert main(tiny_args(data, out, "--resume", "auto", "--input_size", "48")) == 2
    line = one_error_line(capsys)
    assert "pos_embed is [1, 5, 192] in the checkpoint, [1, 10, 192] here" in line and "--input_size 32" in line


def test_resume_auto_falls_back_to_checkpoint_prev_when_checkpoint_last_is_truncated(tmp_path, caplog):
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    assert main(tiny_args(data, out, "--max_steps", "2", "--save_last_every", "1")) == 0
    last = out / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:2000])  # a copy cut short
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        trainer = MAETrainer(config_from_args(tiny_args(data, out, "--resume", "auto")))
    assert trainer.step == 1 and trainer.last_saved == out / "checkpoint-prev.pth"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "checkpoint-last.pth" in warning and "checkpoint-prev.pth" in warning and "cannot be read" in warning
