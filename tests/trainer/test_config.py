"""Flags, defaults and their errors."""

import pytest

from mae_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from mae_fast.pretrain import build_parser, config_from_args, main


def test_no_flags_is_the_builtin_demo():
    cfg = config_from_args([])
    assert cfg.is_demo and cfg.model.name == "mae_vit_tiny_patch16" and cfg.data.input_size == 64
    assert cfg.data.data_path is None and cfg.output_dir == "./output_dir" and cfg.log_dir == "./output_dir"
    assert cfg.knn_every == 5  # the demo shows the kNN monitor; real runs ask for it
    assert config_from_args(["--data_path", "."]).knn_every == 0


def test_official_defaults_with_a_data_path(tmp_path):
    cfg = config_from_args(["--data_path", str(tmp_path)])
    assert (cfg.model.name, cfg.data.input_size, cfg.data.batch_size, cfg.epochs) == ("mae_vit_large_patch16", 224, 64, 400)
    assert (cfg.optim.blr, cfg.optim.weight_decay, cfg.optim.warmup_epochs, cfg.model.mask_ratio) == (1e-3, 0.05, 40, 0.75)


def test_official_flag_names_parse(tmp_path):
    cfg = config_from_args(["--batch_size", "8", "--epochs", "3", "--accum_iter", "2", "--model", "mae_vit_base_patch16",
                            "--input_size", "96", "--mask_ratio", "0.6", "--norm_pix_loss", "--weight_decay", "0.1",
                            "--lr", "0.002", "--blr", "0.0015", "--min_lr", "1e-6", "--warmup_epochs", "1",
                            "--data_path", str(tmp_path), "--output_dir", "out", "--log_dir", "logs", "--resume", "auto",
                            "--start_epoch", "1", "--num_workers", "3", "--seed", "5", "--local_rank", "0"])
    assert cfg.data.batch_size == 8 and cfg.accum_iter == 2 and cfg.model.norm_pix_loss and cfg.optim.lr == 0.002
    assert cfg.log_dir == "logs" and cfg.resume == "auto" and cfg.start_epoch == 1 and cfg.seed == 5


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.dest
            assert action.option_strings[0] in text


@pytest.mark.parametrize("argv,message", [
    (["--batch_size", "-4"], "--batch_size: must be a positive integer, got -4"),
    (["--mask_ratio", "1.0"], r"--mask_ratio: must be in \(0, 1\).*got 1.0"),
    (["--model", "vit_giant"], "--model: must be one of .*got 'vit_giant'"),
    (["--data_path", "/no/such/folder"], "--data_path: is neither an existing folder nor a shard set"),
    (["--precision", "fp4"], "--precision: must be one of"),
    (["--compile_scope", "layers"], "--compile_scope: must be one of model, blocks"),
    (["--accum_iter", "0"], "--accum_iter: must be a positive integer, got 0"),
    (["--blr", "-1"], "--blr: must be a finite number >= 0, got -1.0"),
])
def test_bad_flags_name_the_flag_and_value(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        config_from_args(argv)
    assert main(argv) == 2
    assert "mae_fast.pretrain: error: --" in capsys.readouterr().err


def test_dataclasses_validate_on_their_own():
    with pytest.raises(ValueError, match="--num_workers"):
        DataConfig(num_workers=-1)
    with pytest.raises(ValueError, match="--kernel_backend"):
        ModelConfig(kernel_backend="cutlass")
    with pytest.raises(ValueError, match="--optimizer"):
        OptimConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="--epochs"):
        RunConfig(epochs=0)


def _flag_case(tmp_path, case):
    """argv for each flag value that once ended in a traceback or a hang, and the words its one line must hold."""
    from PIL import Image

    image = tmp_path / "some.jpg"
    Image.new("RGB", (40, 40)).save(image)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a file, not a folder\n")
    return {
        "data_path_image": (["--data_path", str(image)], "--data_path: is a file that is neither a .tar shard nor"),
        "val_path_image": (["--val_path", str(image)], "--val_path: is a file that is neither a .tar shard nor"),
        "log_dir_under_a_file": (["--log_dir", str(a_file / "tb")], f"--log_dir: cannot be created: {a_file}"),
        "huge_brace_pattern": (["--data_path", str(tmp_path / "s-{000000000..099999999}.tar")],
                               "--data_path: the brace pattern names 100,000,000 shards"),
        "huge_nested_braces": (["--data_path", "pipe:cat /s-{0000..9999}-{0000..9999}.tar"],
                               "--data_path: the brace pattern names 100,000,000 shards"),
        "mask_ratio_keeps_nothing": (["--mask_ratio", "0.99", "--input_size", "32"],
                                     r"--mask_ratio: keeps int(4 x (1 - 0.99)) = 0 of the 4 patches"),
        "one_patch": (["--input_size", "16"], "--input_size: 16 px gives 1 patch of 16 px"),
    }[case]


@pytest.mark.parametrize("case", ["data_path_image", "val_path_image", "log_dir_under_a_file", "huge_brace_pattern",
                                  "huge_nested_braces", "mask_ratio_keeps_nothing", "one_patch"])
def test_flags_that_gave_a_traceback_or_hung_are_one_line(tmp_path, capsys, case):
    import re

    argv, message = _flag_case(tmp_path, case)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_args(argv)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and message in err


def test_flash_attn_without_the_package_is_one_line(capsys, monkeypatch):
    import sys

    import mae_fast.attention as attention

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable, whether installed or not
    monkeypatch.setattr(attention, "_FLASH_ATTN", {})
    with pytest.raises(ValueError, match="--attn_backend: flash_attn cannot run: the flash_attn package is not "
                                         "importable .*use --attn_backend auto or sdpa, got 'flash_attn'"):
        config_from_args(["--attn_backend", "flash_attn"])
    assert main(["--attn_backend", "flash_attn"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("mae_fast.pretrain: error: --attn_backend")


def test_a_mask_ratio_that_keeps_one_patch_and_masks_one_trains():
    cfg = config_from_args(["--mask_ratio", "0.75", "--input_size", "32"])  # 1 of 4 kept
    assert cfg.model.mask_ratio == 0.75
    config_from_args(["--mask_ratio", "0.5", "--input_size", "32"])
