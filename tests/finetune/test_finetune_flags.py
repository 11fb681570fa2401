"""The fine-tuning command's flags: the official names and defaults, and one line for each bad input."""

import subprocess
import sys

import pytest

from mae_fast.config import FINETUNE_DEFAULTS
from mae_fast.errors import ConfigError
from mae_fast.finetune import build_parser, config_from_args


@pytest.fixture
def data(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
    return str(tmp_path / "data")


def test_the_official_defaults(data, tmp_path):
    # The official main_finetune.py's defaults, each one a value a wrong table would change.
    config = config_from_args(["--data_path", data, "--output_dir", str(tmp_path / "out")])
    assert (config.model.name, config.data.input_size, config.data.batch_size, config.epochs) == \
        ("vit_large_patch16", 224, 64, 50)
    assert FINETUNE_DEFAULTS["model"] == "vit_large_patch16"
    assert (config.optim.blr, config.optim.min_lr, config.optim.layer_decay, config.optim.weight_decay,
            config.optim.warmup_epochs, config.optim.clip_grad) == (1e-3, 1e-6, 0.75, 0.05, 5, None)
    assert (config.model.drop_path, config.model.global_pool, config.model.nb_classes) == (0.1, True, None)
    aug = config.aug
    assert (aug.aa, aug.smoothing, aug.reprob, aug.remode, aug.recount, aug.resplit) == \
        ("rand-m9-mstd0.5-inc1", 0.1, 0.25, "pixel", 1, False)
    assert (aug.mixup, aug.cutmix, aug.cutmix_minmax, aug.mixup_prob, aug.mixup_switch_prob, aug.mixup_mode) == \
        (0.0, 0.0, None, 1.0, 0.5, "batch")
    assert (config.eval, config.dist_eval, config.output_dir) == (False, False, str(tmp_path / "out"))


def test_the_official_fine_tuning_command_parses(data, tmp_path):
    # FINETUNE.md's ViT-B command, flag for flag.
    config = config_from_args(
        ["--batch_size", "32", "--model", "vit_base_patch16", "--epochs", "100", "--blr", "5e-4", "--layer_decay",
         "0.65", "--weight_decay", "0.05", "--drop_path", "0.1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix",
         "1.0", "--dist_eval", "--data_path", data, "--output_dir", str(tmp_path / "o"), "--cutmix_minmax", "0.2",
         "0.8", "--cls_token", "--clip_grad", "5", "--aa", "none"])
    assert (config.model.name, config.optim.blr, config.optim.layer_decay, config.aug.mixup, config.aug.cutmix) == \
        ("vit_base_patch16", 5e-4, 0.65, 0.8, 1.0)
    assert config.dist_eval and not config.model.global_pool and config.aug.cutmix_minmax == [0.2, 0.8]
    assert config.optim.clip_grad == 5 and config.aug.aa is None
    assert config_from_args(["--data_path", data, "--global_pool", "--output_dir", str(tmp_path / "o")]
                            ).model.global_pool


@pytest.mark.parametrize("flags, named", [
    (["--eval"], "--eval"),
    (["--layer_decay", "0"], "--layer_decay"),
    (["--layer_decay", "1.5"], "--layer_decay"),
    (["--aa", "rand-zz9"], "--aa"),
    (["--finetune", "/nonexistent/mae_pretrain_vit_base.pth"], "--finetune"),
    (["--mixup", "0.8", "--batch_size", "3"], "--batch_size"),
    (["--mixup", "0.8", "--nb_classes", "1"], "--nb_classes"),
    (["--data_backend", "synthetic"], "--data_backend"),
    (["--data_backend", "dali", "--aa", "original"], "--aa"),  # DALI runs RandAugment policies or none
    (["--model", "mae_vit_base_patch16"], "--model"),
    (["--drop_path", "1"], "--drop_path"),
    (["--clip_grad", "0"], "--clip_grad"),
    (["--input_size", "100", "--model", "vit_tiny_patch16"], "--input_size"),
])
def test_bad_flags_name_the_flag(data, tmp_path, flags, named):
    with pytest.raises(ConfigError, match=f"^{named}"):
        config_from_args(["--data_path", data, "--output_dir", str(tmp_path / "o"), *flags])


def test_the_demo_without_the_quick_start_checkpoint_says_which_command_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="python -m mae_fast.pretrain"):
        config_from_args([])


def test_a_mistake_is_one_line_and_exit_2(data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mae_fast.finetune", "--data_path", data, "--layer_decay", "2",
                             "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("mae_fast.finetune: error: --layer_decay") and len(lines) == 1, result.stderr


def test_help_lists_the_official_flags():
    text = build_parser().format_help()
    for flag in ("--finetune", "--nb_classes", "--global_pool", "--cls_token", "--drop_path", "--layer_decay",
                 "--smoothing", "--mixup", "--cutmix_minmax", "--aa", "--reprob", "--remode", "--recount", "--resplit",
                 "--dist_eval", "--eval", "--data_backend", "--precision", "--compile", "--fsdp", "--global_batch"):
        assert flag in text
    assert "83.664" in text
