"""python -m mae_fast.linprobe: features cached and reused, the official head, results, and its errors."""

import json

import pytest
import torch

import mae_fast.knn
from mae_fast import create_model
from mae_fast.linprobe import main, probe_head
from helpers import colored_classes


def checkpoint(tmp_path, seed=0):
    torch.manual_seed(seed)
    path = tmp_path / f"ckpt{seed}.pth"
    torch.save({"model": create_model("mae_vit_tiny_patch16", img_size=32).state_dict()}, path)
    return path


def args(data, ckpt, out, *extra):
    return ["--checkpoint", str(ckpt), "--data_path", str(data), "--output_dir", str(out), "--input_size", "32",
            "--epochs", "30", "--warmup_epochs", "3", "--batch_size", "8", "--device", "cpu", "--data_backend",
            "torch", "--num_workers", "0", "--blr", "10", *[str(e) for e in extra]]
    # --blr 10: LARS's trust ratio (0.001 x |w| / |g|) makes each step tiny; the official 0.1 is for batches of 16384


def test_the_probe_learns_separable_classes_and_writes_its_results(tmp_path, capsys):
    data = colored_classes(tmp_path / "data")
    out = tmp_path / "probe"
    assert main(args(data, checkpoint(tmp_path), out)) == 0
    assert "linear probe: top-1" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["top1"] >= 0.99 and results["top5"] == 1.0 and results["classes"] == 3
    assert results["train_images"] == 18 and results["val_images"] == 9
    saved = torch.load(out / "head.pth", weights_only=True)
    head = probe_head(192, 3)
    head.load_state_dict(saved["head"])
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine and head[0].eps == 1e-6
    assert saved["classes"] == ["blue", "green", "red"]
    assert (saved["pool"], results["pool"], results["optimizer"]) == ("cls", "cls", "lars")  # the official defaults


def official_lars_step(params, momenta, lr, weight_decay, momentum=0.9, trust_coefficient=0.001):
    """One step of the official MAE LARS (util/lars.py), written from its rule: matrices get weight decay and the
    trust ratio, 1-D parameters neither; then momentum SGD."""
    for p, mu in zip(params, momenta):
        dp = p.grad.clone()
        if p.ndim > 1:
            dp = dp + weight_decay * p
            param_norm, update_norm = p.norm(), dp.norm()
            q = torch.where(param_norm > 0, torch.where(update_norm > 0, trust_coefficient * param_norm / update_norm,
                                                        torch.ones(())), torch.ones(()))
            dp = dp * q
        mu.mul_(momentum).add_(dp)
        p.data.add_(mu, alpha=-lr)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_the_head_optimizer_is_the_official_lars(weight_decay):
    from mae_fast.linprobe import probe_optimizer

    torch.manual_seed(0)
    head = probe_head(16, 4)
    reference = [p.detach().clone() for p in head.parameters()]
    momenta = [torch.zeros_like(p) for p in reference]
    optimizer = probe_optimizer(head, "lars", lr=2.0, weight_decay=weight_decay)
    x, y = torch.randn(12, 16), torch.arange(12) % 4
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        ref = [p.detach().clone().requires_grad_(False) for p in reference]
        for r, p in zip(ref, head.parameters()):
            r.grad = p.grad.clone()
        official_lars_step(ref, momenta, 2.0, weight_decay)
        optimizer.step()
        for r, p in zip(ref, head.parameters()):
            # With weight decay timm's trust ratio divides by |g| + wd |w| where the official divides by |g + wd w|:
            # the same rule up to that bound (the official probe has no weight decay).
            torch.testing.assert_close(p.detach(), r, rtol=1e-5 if weight_decay == 0 else 1e-3,
                                       atol=1e-7 if weight_decay == 0 else 1e-6)
        reference = ref


def test_sgd_stays_an_option(tmp_path):
    data = colored_classes(tmp_path / "data")
    out = tmp_path / "probe"
    assert main(args(data, checkpoint(tmp_path), out, "--optimizer", "sgd", "--blr", "0.1")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["optimizer"] == "sgd" and results["top1"] >= 0.99


def test_features_are_cached_and_reused_until_the_checkpoint_changes(tmp_path, monkeypatch):
    data = colored_classes(tmp_path / "data", per_class=2)
    out = tmp_path / "probe"
    calls = []
    real = mae_fast.knn.extract_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mae_fast.knn, "extract_features", counting)
    ckpt = checkpoint(tmp_path)
    assert main(args(data, ckpt, out)) == 0 and len(calls) == 2  # train and val
    assert main(args(data, ckpt, out, "--epochs", "5")) == 0 and len(calls) == 2  # reused
    assert main(args(data, ckpt, out, "--global_pool")) == 0 and len(calls) == 4  # other features
    assert main(args(data, ckpt, out, "--pool", "mean")) == 0 and len(calls) == 4  # the same ones, by name
    torch.save({"model": create_model("mae_vit_tiny_patch16", img_size=32).state_dict()}, ckpt)  # rewritten
    assert main(args(data, ckpt, out)) == 0 and len(calls) == 6


@pytest.mark.parametrize("case", ["flat", "missing_class", "no_val"])
def test_bad_folders_are_one_line(tmp_path, capsys, case):
    data = colored_classes(tmp_path / "data", per_class=2)
    extra = []
    if case == "flat":
        from PIL import Image

        flat = tmp_path / "flat"
        flat.mkdir()
        Image.new("RGB", (40, 40)).save(flat / "a.jpg")
        extra = ["--val_path", flat]
        expected = "the linear probe needs classes"  # not the kNN monitor: that is pretraining's
    elif case == "missing_class":
        colored_classes(tmp_path / "other", per_class=2, classes=("gray",))
        extra = ["--val_path", tmp_path / "other" / "val"]
        expected = "the validation set has classes the training set lacks: ['gray']"
    else:
        import shutil

        shutil.rmtree(data / "val")
        expected = "has no val/ folder"
    assert main(args(data, checkpoint(tmp_path), tmp_path / "probe", *extra)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_data_path_that_does_not_exist_is_named_as_such(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(args(missing, checkpoint(tmp_path), tmp_path / "probe")) == 2
    err = capsys.readouterr().err
    assert f"--data_path {str(missing)!r} does not exist" in err and "val/" not in err and "Traceback" not in err
    assert main(args(tmp_path, tmp_path / "nope.pth", tmp_path / "probe")) == 2
    assert f"--checkpoint {str(tmp_path / 'nope.pth')!r} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "probe").exists()  # nothing written, no folder left behind


def test_feature_extraction_shows_its_progress(tmp_path, caplog, monkeypatch):
    import logging

    monkeypatch.setattr("mae_fast.progress.FIRST_LINE_SECONDS", 0.0)  # a line for every batch
    monkeypatch.setattr("mae_fast.progress.LINE_SECONDS", 0.0)
    data = colored_classes(tmp_path / "data", per_class=4)  # 12 training and 6 validation images
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        assert main(args(data, checkpoint(tmp_path), tmp_path / "probe", "--extract_batch_size", "4")) == 0
    lines = [r.getMessage() for r in caplog.records if "features:" in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == ["train features: batch 1/3", "train features: batch 2/3",
                                                      "train features: batch 3/3", "val features: batch 1/2",
                                                      "val features: batch 2/2"], lines
    assert all("images/s" in line for line in lines) and "ETA" in lines[0]


def test_torchrun_extracts_on_every_rank_and_gives_the_same_probe(tmp_path):
    import os
    import subprocess
    import sys

    data = colored_classes(tmp_path / "data", per_class=3)  # 9 + 4 images: the ranks' last batches are padded
    ckpt = checkpoint(tmp_path)
    assert main(args(data, ckpt, tmp_path / "one", "--extract_batch_size", "2")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "mae_fast.linprobe", *args(data, ckpt, tmp_path / "two", "--extract_batch_size", "2")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one = torch.load(next((tmp_path / "one").glob("features-*.pt")), weights_only=True)
    two = torch.load(next((tmp_path / "two").glob("features-*.pt")), weights_only=True)
    for split in ("train", "val"):
        # The cls token after the norm is O(1): summation order across batch sizes moves its last digits.
        torch.testing.assert_close(two[split], one[split], rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["top1"] == \
        json.loads((tmp_path / "one" / "results.json").read_text())["top1"]


def counting_extraction(monkeypatch) -> list:
    calls = []
    real = mae_fast.knn.extract_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mae_fast.knn, "extract_features", counting)
    return calls


def test_the_feature_cache_is_written_atomically(tmp_path, monkeypatch):
    data = colored_classes(tmp_path / "data", per_class=2)
    out = tmp_path / "probe"
    ckpt = checkpoint(tmp_path)
    real_save = torch.save

    def killed_while_writing(obj, f, *a, **k):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a cache")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        main(args(data, ckpt, out))
    assert not list(out.glob("features-*")) and not list(out.glob(".features-*"))  # no cache, no temporary
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args(data, ckpt, out)) == 0


@pytest.mark.parametrize("damage", ["truncated", "too_few_rows", "nan_features", "checksum", "old_format"])
def test_a_cache_that_does_not_match_is_recomputed_with_one_warning(tmp_path, monkeypatch, caplog, damage):
    import logging

    data = colored_classes(tmp_path / "data", per_class=2)
    out = tmp_path / "probe"
    calls = counting_extraction(monkeypatch)
    ckpt = checkpoint(tmp_path)
    assert main(args(data, ckpt, out)) == 0 and len(calls) == 2
    (cache,) = out.glob("features-*.pt")
    good = cache.read_bytes()
    stored = torch.load(cache, weights_only=True)
    if damage == "truncated":  # a kill while an older version wrote it to its final name
        cache.write_bytes(good[: len(good) // 2])
    elif damage == "old_format":
        torch.save({"train": stored["train"], "val": stored["val"]}, cache)
    else:
        features = {key: stored[key].clone() for key in ("train", "val", "train_kept", "val_kept")}
        if damage == "too_few_rows":
            features["train"] = features["train"][:2]
        elif damage == "nan_features":
            features["val"][0, 0] = float("nan")
        else:
            features["train"][1, 3] += 1.0
        keep = "checksum" if damage == "checksum" else None
        rewritten = dict(stored, **features)
        if keep is None:  # consistent shapes and checksum, wrong content for these images
            from mae_fast.linprobe import feature_checksum

            rewritten["shapes"] = {split: list(features[split].shape) for split in ("train", "val")}
            rewritten["checksum"] = feature_checksum(features)
        torch.save(rewritten, cache)
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        assert main(args(data, ckpt, out)) == 0
    assert len(calls) == 4  # extracted again
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "extracting the features again" in warnings[0]
    assert torch.equal(torch.load(cache, weights_only=True)["train"], stored["train"])


def test_a_pickle_in_the_cache_is_refused_with_one_line(tmp_path, monkeypatch, capsys):
    import os
    import pickle

    data = colored_classes(tmp_path / "data", per_class=2)
    out = tmp_path / "probe"
    ckpt = checkpoint(tmp_path)
    assert main(args(data, ckpt, out)) == 0
    (cache,) = out.glob("features-*.pt")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for payload in (pickle.dumps(Payload(), protocol=2), pickle.dumps(Payload(), protocol=4)):
        cache.write_bytes(payload)
        capsys.readouterr()
        assert main(args(data, ckpt, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(cache) in err and "refusing" in err
        assert not marker.exists() and cache.read_bytes() == payload  # nothing ran; the file is left for a look


def test_non_finite_features_stop_with_one_line_naming_the_checkpoint(tmp_path, capsys):
    data = colored_classes(tmp_path / "data", per_class=2)
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    ckpt = tmp_path / "nan.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    assert main(args(data, ckpt, tmp_path / "probe")) == 2
    captured = capsys.readouterr()
    assert "top-1" not in captured.out
    assert captured.err.count("\n") == 1 and "non-finite features" in captured.err and str(ckpt) in captured.err
    assert not (tmp_path / "probe" / "results.json").exists() and not list((tmp_path / "probe").glob("features-*"))


def test_a_head_that_diverges_stops_with_one_line_naming_the_checkpoint(tmp_path, capsys):
    data = colored_classes(tmp_path / "data", per_class=2)
    ckpt = checkpoint(tmp_path)
    assert main(args(data, ckpt, tmp_path / "probe", "--blr", "1e38", "--optimizer", "sgd")) == 1
    captured = capsys.readouterr()
    assert "top-1" not in captured.out and captured.err.count("\n") == 1
    assert "the probe head became non-finite" in captured.err and str(ckpt) in captured.err
    assert not (tmp_path / "probe" / "results.json").exists()


@pytest.mark.parametrize("flag,value,message", [("--blr", "nan", r"--blr: must be a finite number > 0 .*got nan"),
                                                ("--blr", "inf", r"--blr: must be a finite number > 0 .*got inf"),
                                                ("--blr", "-1", r"--blr: must be a finite number > 0 .*got -1.0"),
                                                ("--warmup_epochs", "-5",
                                                 "--warmup_epochs: must be an integer >= 0, got -5")])
def test_schedule_flags_that_cannot_train_are_refused(tmp_path, capsys, monkeypatch, flag, value, message):
    import re

    data = colored_classes(tmp_path / "data", per_class=2)
    calls = counting_extraction(monkeypatch)
    assert main(args(data, checkpoint(tmp_path), tmp_path / "probe", flag, value)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err) and not calls  # before any work


def test_a_corrupt_safetensors_file_and_a_bad_input_size_are_one_line(tmp_path, capsys):
    data = colored_classes(tmp_path / "data", per_class=2)
    corrupt = tmp_path / "weights.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    assert main(args(data, corrupt, tmp_path / "probe")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot read checkpoint {str(corrupt)!r}" in err
    assert main(args(data, checkpoint(tmp_path), tmp_path / "probe", "--input_size", "30")) == 2
    err = capsys.readouterr().err
    assert "--input_size" in err and "--img_size" not in err and "for example 16 or 32" in err and "got 30" in err
