"""Short fine-tuning runs on the CPU: the official log and checkpoint layouts, --eval, exact resume, --dist_eval over
two gloo ranks, the DALI backend on its CPU pipeline, and the bad inputs that need the data or a checkpoint to be
found."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mae_fast import create_model
from mae_fast.data import dali_unavailable_reason
from mae_fast.finetune import FineTuner, config_from_args, main

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def labeled(root: Path, train: int = 4, val: int = 3) -> Path:
    """``train/<color>/`` and ``val/<color>/`` of noisy images whose class is their color."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", val)):
        for name, color in COLORS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = torch.randint(-25, 26, (40, 40, 3), generator=generator)
                pixels = (torch.tensor(color) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def pretrained(path: Path, name: str = "mae_vit_tiny_patch16") -> Path:
    torch.manual_seed(0)
    torch.save({"model": create_model(name, img_size=32).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return labeled(root / "data"), pretrained(root / "mae.pth"), root


def flags(data, out, *extra):
    return ["--data_path", str(data), "--output_dir", str(out), "--model", "vit_tiny_patch16", "--input_size", "32",
            "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu",
            "--log_every", "1", *[str(e) for e in extra]]


def test_a_short_fine_tune_logs_as_the_official_script_and_its_checkpoint_loads_into_timm(setup, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    data, mae, _ = setup
    out = tmp_path / "out"
    tuner = FineTuner(config_from_args(flags(data, out, "--finetune", mae, "--mixup", "0.8", "--cutmix", "1.0")))
    tuner.fit()
    printed = capsys.readouterr().out
    assert printed.count("* Acc@1 ") == 2  # the official line, once per epoch
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert set(lines[0]) == {"train_lr", "train_loss", "test_acc1", "test_acc5", "test_loss", "epoch", "n_parameters"}
    state = torch.load(out / "checkpoint-1.pth", weights_only=True)["model"]
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, global_pool="avg", fc_norm=True)
    reference.load_state_dict(state, strict=True)  # the official fine-tuned layout: fc_norm.* and head.*

    # --eval on that checkpoint gives the last epoch's figures, and appends them to log.txt.
    evaluated = FineTuner(config_from_args(flags(data, out, "--eval", "--resume", out / "checkpoint-1.pth"))).run_eval()
    assert evaluated == {key: lines[-1][key] for key in ("test_acc1", "test_acc5", "test_loss")}
    assert json.loads((out / "log.txt").read_text().splitlines()[-1]) == evaluated


@pytest.mark.skipif(dali_unavailable_reason() is not None, reason=str(dali_unavailable_reason()))
def test_a_short_fine_tune_on_dali_trains_evaluates_and_logs_as_the_official_script(setup, tmp_path, capsys):
    # DALI's CPU pipeline for training (random erasing, then mixup and cutmix on the batch) and evaluation; --aa none
    # keeps the pipeline quick to define here (RandAugment on DALI: tests/data/test_dali_finetune.py).
    data, mae, _ = setup
    out = tmp_path / "out"
    tuner = FineTuner(config_from_args(flags(data, out, "--finetune", mae, "--data_backend", "dali", "--epochs", "1",
                                             "--warmup_epochs", "0", "--mixup", "0.8", "--cutmix", "1.0", "--aa",
                                             "none", "--reprob", "0.5", "--batch_size", "6")))
    assert tuner.loader.backend == tuner.val_loader.backend == "dali"
    assert tuner.loader.inner.recipe.erasing.probability == 0.5 and tuner.mixup is not None
    head = tuner.model.head.weight.detach().clone()
    tuner.fit()
    assert not torch.equal(head, tuner.model.head.weight.detach())  # it trained: 2 steps of 6 images
    assert capsys.readouterr().out.count("* Acc@1 ") == 1
    (line,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert set(line) == {"train_lr", "train_loss", "test_acc1", "test_acc5", "test_loss", "epoch", "n_parameters"}
    assert line["epoch"] == 0 and 0 < line["train_loss"] < 5 and 0 < line["test_loss"] < 5
    assert line["test_acc1"] in {100 * k / 9 for k in range(10)}  # 9 validation images, each counted once


def test_eval_of_an_official_layout_state_dict_equals_timm(setup, tmp_path):
    # A cls-token classifier in timm's layout (norm.* and head.*, no fc_norm), as an official checkpoint holds it.
    timm = pytest.importorskip("timm")
    data, _, _ = setup
    torch.manual_seed(1)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, global_pool="token").eval()
    path = tmp_path / "official.pth"
    torch.save({"model": reference.state_dict()}, path)
    tuner = FineTuner(config_from_args(flags(data, tmp_path / "o", "--eval", "--resume", path, "--cls_token")))
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tuner.model.eval()(images), reference(images), rtol=1e-4, atol=1e-5)


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(setup, tmp_path):
    # Mixup (numpy's generator), drop path (torch's), RandAugment and random erasing (the loader's per-slot seeds):
    # each must continue exactly, or the weights differ.
    data, mae, _ = setup
    extra = ["--finetune", mae, "--mixup", "0.8", "--cutmix", "1.0", "--save_last_every", "1"]
    whole = FineTuner(config_from_args(flags(data, tmp_path / "whole", *extra)))
    whole.fit()
    FineTuner(config_from_args(flags(data, tmp_path / "cut", *extra, "--max_steps", "4"))).fit()  # epoch 2, batch 1
    resumed = FineTuner(config_from_args(flags(data, tmp_path / "cut", *extra, "--resume", "auto")))
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 1)
    resumed.fit()
    for (key, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)


def test_dist_eval_over_two_gloo_ranks_gives_the_one_rank_figures(setup, tmp_path):
    from mae_fast.vit import create_vit

    data, _, _ = setup
    torch.manual_seed(3)  # a classifier whose predictions vary from image to image
    checkpoint = tmp_path / "classifier.pth"
    torch.save({"model": create_vit("vit_tiny_patch16", img_size=32, num_classes=3).state_dict()}, checkpoint)
    # 9 validation images, batches of 2: the ranks get 5 and 4 (one padded slot), and batches end part-full.
    common = flags(data, tmp_path / "eval", "--eval", "--resume", checkpoint, "--batch_size", "2")
    assert main(common) == 0
    one = json.loads((tmp_path / "eval" / "log.txt").read_text().splitlines()[-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "mae_fast.finetune", *flags(data, tmp_path / "two", "--eval", "--resume", checkpoint,
                                                      "--batch_size", "2", "--dist_eval")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "log.txt").read_text().splitlines()[-1])
    assert two["test_acc1"] == one["test_acc1"] and two["test_acc5"] == one["test_acc5"]
    # The loss sums float64 per-image losses, but each image's float32 logits may move in their last bit with the
    # other images of its batch (another blocking of the matrix products): equal far below any reported digit.
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-6)  # float32's last bits, not an image more


@pytest.mark.parametrize("case", ["nb_classes", "size", "pretraining_resume", "no_labels"])
def test_bad_inputs_are_one_line_before_training(setup, tmp_path, capsys, case):
    data, mae, root = setup
    extra, expected = {
        "nb_classes": (["--nb_classes", "5"], "--nb_classes: the training data has 3 classes, not 5"),
        "size": (["--finetune", mae, "--model", "vit_small_patch16"], "192-wide"),
        "pretraining_resume": (["--resume", mae], "is a pretraining checkpoint"),
        "no_labels": ([], "class"),
    }[case]
    if case == "no_labels":
        flat = tmp_path / "flat" / "train"
        flat.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(flat / f"{i}.jpg")
        data = tmp_path / "flat"
    assert main(flags(data, tmp_path / "o", *extra)) == 2  # the later --model wins, as argparse reads flags
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mae_fast.finetune: error: ") and expected in err[0], err
    if case == "size":
        assert "384-wide" in err[0]  # both sizes named


def test_the_first_ctrl_c_stops_an_evaluation_at_once(setup, tmp_path, capsys, monkeypatch):
    # --eval has no step to stop after: a Ctrl-C must not wait for the whole validation set (it did).
    import signal
    import time

    from mae_fast.vit import create_vit

    data, _, _ = setup
    torch.manual_seed(1)
    path = tmp_path / "finetuned.pth"
    torch.save({"model": create_vit("vit_tiny_patch16", img_size=32, num_classes=3).state_dict()}, path)
    evaluated = []

    def pressed_during_the_evaluation(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(2)  # the interrupt arrives here
        evaluated.append(True)

    monkeypatch.setattr(FineTuner, "run_eval", pressed_during_the_evaluation)
    assert main(flags(data, tmp_path / "o", "--eval", "--resume", path)) == 130
    assert not evaluated
    err = capsys.readouterr().err
    assert f"mae_fast.finetune: interrupted during the evaluation of {path}; nothing was written" in err
