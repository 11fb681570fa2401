"""The kNN monitor: the weighted vote, labeled folders, and the trainer reporting it on one and two ranks."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mae_fast.errors import DataError
from mae_fast.knn import KnnMonitor, labeled_images, top_k_accuracy, weighted_knn
from mae_fast.pretrain import main
from helpers import colored_classes, tiny_args, write_images
from knn_worker import run_knn_recording_features


def test_the_weighted_vote_is_the_dino_protocol():
    torch.manual_seed(0)
    bank, labels, queries = torch.randn(50, 8), torch.randint(0, 4, (50,)), torch.randn(7, 8)
    scores = weighted_knn(bank, labels, queries, num_classes=4, k=20, temperature=0.07, chunk=3)
    b, q = F.normalize(bank.double(), dim=1), F.normalize(queries.double(), dim=1)
    for row, query in enumerate(q):
        similarity = b @ query
        expected = torch.zeros(4, dtype=torch.float64)
        for index in similarity.argsort(descending=True)[:20]:
            expected[labels[index]] += torch.exp(similarity[index] / 0.07)
        torch.testing.assert_close(scores[row].double(), expected, rtol=1e-4, atol=1e-6)
    assert top_k_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5
    assert top_k_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), k=2) == 1.0


def labeled_folder(root, classes=("a", "b", "c"), per_class=4):
    for name in classes:
        write_images(root / name, per_class)
    return root


def test_labeled_folders_and_their_errors(tmp_path):
    files, labels, classes = labeled_images(labeled_folder(tmp_path / "set"), "val")
    assert classes == ["a", "b", "c"] and len(files) == 12 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    flat = write_images(tmp_path / "flat", 4)
    with pytest.raises(DataError, match="the kNN monitor needs classes: .*flat.* has no class sub-folders"):
        labeled_images(flat, "val")
    with pytest.raises(DataError, match="lacks classes of the validation set .*\\['c'\\]"):
        KnnMonitor(tmp_path / "set", labeled_folder(tmp_path / "bank", ("a", "b")), 100, make_loader=None)


def test_the_bank_is_a_fixed_subset_of_its_size(tmp_path):
    bank = labeled_folder(tmp_path / "bank", per_class=6)
    made = []
    monitor = KnnMonitor(labeled_folder(tmp_path / "val"), bank, 10, make_loader=lambda files: made.append(files))
    again = KnnMonitor(labeled_folder(tmp_path / "val"), bank, 10, make_loader=lambda files: made.append(files))
    assert monitor.num_bank == 10 and made[1] == made[3]  # the same ten files every time
    assert monitor.bank_labels.tolist() == [["a", "b", "c"].index(f.split("/")[-2]) for f in made[1]]


def test_the_trainer_reports_knn_to_the_console_the_log_and_tensorboard(tmp_path, capfd, caplog):
    data = labeled_folder(tmp_path / "train")
    val = labeled_folder(tmp_path / "val", per_class=2)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        assert main(tiny_args(data, out, "--val_path", str(val), "--knn_every", "1", "--epochs", "2")) == 0
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert all(0 <= line["knn_top1"] <= line["knn_top5"] <= 1 for line in lines)
    printed = capfd.readouterr().out
    assert printed.count("kNN top-1 ") == 2  # each epoch's summary
    assert "kNN top-1 at initialization" in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload()
    assert len(events.Scalars("val/knn_top1")) == 3  # initialization and both epochs


def test_knn_mistakes_are_one_line(tmp_path, capsys):
    data = write_images(tmp_path / "data", 8)
    assert main(tiny_args(data, tmp_path / "out", "--knn_every", "1")) == 2
    assert "--knn_every: needs --val_path" in capsys.readouterr().err
    assert main(tiny_args(data, tmp_path / "out", "--knn_every", "1", "--val_path", str(data))) == 2
    err = capsys.readouterr().err
    assert "the kNN monitor needs classes" in err and "Traceback" not in err


def test_two_ranks_gather_the_features_and_agree_with_one(tmp_path):
    # Each image's features, bank and validation, are compared row by row: a gather that drops, duplicates or
    # scrambles entries puts another row (or zeros) at some index. The classes are solid colors, one shade per image:
    # every row differs, and top-1 depends on which bank entry holds which label.
    root = colored_classes(tmp_path / "set", per_class=6)  # bank 18, validation 9: both end in a padded 2 x 2 batch
    args = ["--val_path", str(root / "val"), "--knn_every", "1", "--batch_size", "2"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(Path(__file__).with_name("knn_worker.py")), str(tmp_path / "two"),
                          *tiny_args(root / "train", tmp_path / "out_two", *args)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one = run_knn_recording_features(tiny_args(root / "train", tmp_path / "out_one", *args))
    assert one["world_size"] == 1 and one["bank"].shape[0] == 18 and one["val"].shape[0] == 9
    assert one["knn_top1"] == 1.0  # separable: a bank entry at the wrong index would cost votes
    for rank in (0, 1):
        two = torch.load(f"{tmp_path / 'two'}.rank{rank}", weights_only=True)
        assert two["world_size"] == 2 and two["rank"] == rank
        for name in ("bank", "val"):
            # Same weights and images in float32, batched differently: measured apart by 1e-6 (entries up to 4),
            # while any two rows are at least 0.9 apart.
            for row, (got, want) in enumerate(zip(two[name], one[name], strict=True)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {name} row {row}")
        assert (two["knn_top1"], two["knn_top5"]) == (one["knn_top1"], one["knn_top5"])


def test_classes_the_features_separate_are_found(tmp_path):
    # Solid colors per class: any encoder's features separate them, so the monitor must score near 100%.
    from mae_fast import create_model
    from mae_fast.config import DataConfig
    from mae_fast.data import build_eval_loader

    root = colored_classes(tmp_path / "set", per_class=8)
    config = DataConfig(backend="torch", input_size=32, batch_size=4, num_workers=0)
    monitor = KnnMonitor(root / "val", root / "train", 100,
                         make_loader=lambda files: build_eval_loader(config, files, 0, 1, "cpu", 0))
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32)
    stats = monitor.evaluate(model, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert stats["knn_top1"] == 1.0 and model.training  # and the model is back in training mode
