"""The fine-tuning command's flags: the official names and defaults, and one line for each bad input."""

import subprocess
import sys

import pytest

from mae_fast.config import FINETUNE_DEFAULTS, FINETUNE_DEMO_DEFAULTS, fields
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
    assert (aug.hflip, aug.aa, aug.smoothing, aug.reprob, aug.remode, aug.recount, aug.resplit) == \
        (0.5, "rand-m9-mstd0.5-inc1", 0.1, 0.25, "pixel", 1, False)
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
    assert config.optim.clip_grad == 5 and config.aug.aa == "none" and config.aug.auto_augment is None
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
    (["--hflip", "1.5"], "--hflip"),
    (["--input_size", "100", "--model", "vit_tiny_patch16"], "--input_size"),
])
def test_bad_flags_name_the_flag(data, tmp_path, flags, named):
    with pytest.raises(ConfigError, match=f"^{named}"):
        config_from_args(["--data_path", data, "--output_dir", str(tmp_path / "o"), *flags])


@pytest.fixture
def quick_start(tmp_path, monkeypatch):
    """A folder with the quick start's checkpoint (only its existence is checked before training)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output_dir").mkdir()
    (tmp_path / "output_dir" / "checkpoint-last.pth").write_bytes(b"")
    return tmp_path


def test_the_demo_takes_its_own_defaults_and_a_real_run_the_official_ones(quick_start, data):
    # Without --data_path: an augmentation that keeps the built-in classes (directions) apart.
    demo = config_from_args([])
    assert (demo.model.name, demo.data.input_size, demo.data.batch_size, demo.epochs, demo.optim.warmup_epochs) == \
        ("vit_tiny_patch16", 64, 32, 10, 1)
    assert (demo.aug.hflip, demo.aug.aa, demo.aug.auto_augment) == (0.0, "none", None)
    assert (demo.model.finetune, demo.output_dir) == ("./output_dir/checkpoint-last.pth", "./output_dir/finetune")
    # The rest is the official recipe's, as with --data_path.
    real = config_from_args(["--data_path", data])
    assert (real.aug.hflip, real.aug.aa) == (0.5, "rand-m9-mstd0.5-inc1")
    for section in ("aug", "optim"):
        kept = {f.name for f in fields(getattr(real, section))} - set(FINETUNE_DEMO_DEFAULTS)
        assert {name: getattr(getattr(demo, section), name) for name in kept} == \
            {name: getattr(getattr(real, section), name) for name in kept}, section


def test_a_flag_given_to_the_demo_beats_its_default(quick_start):
    config = config_from_args(["--hflip", "0.5", "--aa", "rand-m9-mstd0.5-inc1", "--finetune", ""])
    assert (config.aug.hflip, config.aug.aa, config.model.finetune) == (0.5, "rand-m9-mstd0.5-inc1", "")
    assert config.warnings()[-1].endswith("random initialization")
    assert config_from_args(["--aa", "none", "--hflip", "0.25"]).aug.hflip == 0.25


def test_the_flip_follows_hflip():
    from torchvision import transforms

    from mae_fast.config import AugConfig
    from mae_fast.data.transforms import official_train_transform

    def flips(aug):
        primary = official_train_transform(32, aug)[0]
        return [t.p for t in primary.transforms if isinstance(t, transforms.RandomHorizontalFlip)]

    assert flips(AugConfig()) == [0.5]
    assert flips(AugConfig(hflip=0.0)) == []
    assert flips(AugConfig(hflip=0.25, aa="none")) == [0.25]


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
                 "--dist_eval", "--eval", "--data_backend", "--precision", "--compile", "--fsdp", "--global_batch",
                 "--hflip"):
        assert flag in text
    # Each default the demo changes is stated with the official one.
    flat = " ".join(text.split())
    for said in ("default 0.5, timm's create_transform's", "0 for the demo", "default rand-m9-mstd0.5-inc1",
                 "none for the demo", "--finetune '' starts it from random initialization"):
        assert said in flat, said
    assert "83.664" in text


@pytest.mark.parametrize("argv", [["--batch_size", "abc"], ["--data_path", "/no/such/folder"], ["--layer_decay", "0"],
                                  ["--model", "vit_giant"], ["--eval"], ["--help"]])
def test_flag_mistakes_and_help_come_before_torch_loads(argv):
    # torch takes seconds to load: a mistake answers first (a --aa policy is read by timm, so after it).
    code = (f"import sys\nfrom mae_fast.finetune import main\ntry:\n    code = main({argv!r})\n"
            "except SystemExit as exc:\n    code = exc.code\nassert code in (0, 2), code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mae_fast.finetune: error: --" in run.stderr or argv == ["--help"], run.stderr


def test_the_recipe_parts_are_importable_from_the_command_module():
    from mae_fast import finetune, finetuner

    for name in finetune.FINETUNER_NAMES:
        assert getattr(finetune, name) is getattr(finetuner, name)
    with pytest.raises(AttributeError, match="no_such_thing"):
        finetune.no_such_thing
