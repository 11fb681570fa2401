"""What every command shows a newcomer: one line per mistake, named as launched, before torch loads; help texts that
state each default once; install hints that match the README."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mae_fast import export, info, linprobe, prepare, pretrain
from helpers import tiny_args, write_images

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"mae_fast.pretrain": pretrain, "mae_fast.prepare": prepare, "mae_fast.linprobe": linprobe,
           "mae_fast.export": export, "mae_fast.info": info}


def only_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    assert "usage:" not in captured.err and "Traceback" not in captured.err, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    return lines[0]


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("command,argv,flag,value", [
    ("mae_fast.pretrain", ["--batch_size", "abc"], "--batch_size", "'abc'"),
    ("mae_fast.pretrain", ["--mask_ratio", "lots"], "--mask_ratio", "'lots'"),
    ("mae_fast.prepare", ["src", "dst", "--workers", "x"], "--workers", "'x'"),
    ("mae_fast.linprobe", ["--checkpoint", "c", "--data_path", "d", "--epochs", "ten"], "--epochs", "'ten'"),
    ("mae_fast.linprobe", ["--checkpoint", "c", "--data_path", "d", "--pool", "max"], "--pool", "'max'"),
    ("mae_fast.export", ["c.pth", "out", "--to", "onnx"], "--to", "'onnx'"),
    ("mae_fast.info", ["--batch_size", "8.5"], "--batch_size", "'8.5'"),
])
def test_a_value_argparse_refuses_is_one_line_without_the_usage(capsys, command, argv, flag, value):
    assert exit_code(MODULES[command].main, argv) == 2
    line = only_line(capsys, command)
    assert line.startswith(f"{command}: error: {flag}: must be ") and line.endswith(f"got {value}"), line


def test_an_unknown_flag_is_one_line_that_points_to_help(capsys):
    assert exit_code(pretrain.main, ["--batchsize", "4"]) == 2
    line = only_line(capsys, "mae_fast.pretrain")
    assert "--batchsize" in line and "--help" in line


def test_the_usage_names_the_launcher_the_command_was_started_with(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for command, module in MODULES.items():
        assert module.build_parser().format_usage().startswith(f"usage: python -m {command} "), command
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun sets it in every process it starts
    assert pretrain.build_parser().format_usage().startswith("usage: torchrun -m mae_fast.pretrain ")


def test_an_unquoted_brace_pattern_the_shell_expanded_is_one_line_saying_to_quote_it(tmp_path, capsys):
    # bash turns --data_path 'shards/train-{000000..000003}.tar' unquoted into four arguments
    names = [f"shards/train-{i:06d}.tar" for i in range(4)]
    assert exit_code(pretrain.main, ["--data_path", *names, "--epochs", "1"]) == 2
    line = only_line(capsys, "mae_fast.pretrain")
    assert "--data_path takes one value, got 4" in line and "quotes" in line
    assert "--data_path 'shards/train-{000000..000003}.tar'" in line
    assert exit_code(pretrain.main, ["--val_path=a/x1.tar", "b/y.tar"]) == 2  # no pattern to rebuild: still says why
    line = only_line(capsys, "mae_fast.pretrain")
    assert "--val_path takes one value, got 2" in line and "quotes" in line
    assert exit_code(pretrain.main, ["--epochs", "3", "4"]) == 2  # numbers: no pattern, no talk of quotes
    assert only_line(capsys, "mae_fast.pretrain").endswith("--epochs takes one value, got 2 (3 4)")


def test_the_errors_of_prepare_carry_the_command_name(tmp_path, capsys):
    assert prepare.main([str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    assert "does not exist" in only_line(capsys, "mae_fast.prepare")
    assert not (tmp_path / "dst").exists()


def test_an_early_error_leaves_no_output_folder_it_created(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "out"
    assert pretrain.main(tiny_args(empty, out)) == 2  # the data check comes after the output folder's
    assert "holds no image files" in only_line(capsys, "mae_fast.pretrain")
    assert not (tmp_path / "new").exists()
    out = tmp_path / "out"
    out.mkdir()  # a folder that was there stays
    assert pretrain.main(tiny_args(empty, out)) == 2
    assert out.is_dir()


def test_a_resume_checkpoint_that_does_not_exist_names_the_flag(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert pretrain.main(["--resume", str(missing)]) == 2
    line = only_line(capsys, "mae_fast.pretrain")
    assert line.startswith("mae_fast.pretrain: error: --resume: ") and str(missing) in line and "auto" in line


def torch_free_run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that fails if anything imported torch."""
    code += "\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    return subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("argv", [["--batch_size", "abc"], ["--data_path", "/no/such/folder"], ["--mask_ratio", "0"],
                                  ["--model", "vit_giant"], ["--input_size", "40"], ["--resume", "/no/such.pth"],
                                  ["--help"]])
def test_flag_mistakes_and_help_come_before_torch_loads(argv):
    run = torch_free_run(f"from mae_fast.pretrain import main\ntry:\n    code = main({argv!r})\n"
                         "except SystemExit as exc:\n    code = exc.code\nassert code in (0, 2), code")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mae_fast.pretrain: error: --" in run.stderr or argv == ["--help"], run.stderr


def test_prepare_does_not_load_torch(tmp_path):
    from PIL import Image

    (tmp_path / "src").mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "src" / "a.jpg")
    run = torch_free_run(f"from mae_fast.prepare import main\nassert main([{str(tmp_path / 'src')!r}, "
                         f"{str(tmp_path / 'dst')!r}, '--workers', '1']) == 0")
    assert run.returncode == 0, run.stderr[-2000:]


def test_help_states_each_default_once():
    for command, module in MODULES.items():
        text = module.build_parser().format_help()
        assert "(default: None)" not in text, command
        # one entry per option: its line and the indented lines under it
        entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1].split("\n\n", 1)[0])
        for entry in entries:
            assert entry.count("default") <= 1, (command, entry)
        for action in module.build_parser()._actions:  # and a value a flag takes when not given is shown
            if action.option_strings and action.default is not None and action.default is not False \
                    and action.default != "==SUPPRESS==":
                entry = next(e for e in entries if e.strip().startswith(action.option_strings[0]))
                assert "default" in entry, (command, entry)


def test_install_hints_are_the_readmes_command():
    readme = (ROOT / "README.md").read_text()
    extras = set(re.findall(r'pip install -e "\.\[(\w+)\]"', readme))
    assert {"dali", "fp8", "export", "flash"} <= extras | set(re.findall(r'`"\.\[(\w+)\]"`', readme))
    sources = [p for folder in ("mae_fast", "kernels") for p in (ROOT / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "mae_fast[" not in text, f"{path}: an install hint other than the README's pip install -e \".[extra]\""
    from mae_fast.errors import install_hint

    assert install_hint("fp8") == 'pip install -e ".[fp8]" (in the mae_fast folder)'


def test_missing_libraries_name_the_readmes_install_command(monkeypatch):
    from mae_fast.attention import flash_attn_unavailable_reason
    from mae_fast.data.dali_loader import dali_unavailable_reason
    from mae_fast.fp8 import torchao_unavailable_reason

    for module in ("torchao.float8", "nvidia.dali", "nvidia.dali.fn", "flash_attn"):
        monkeypatch.setitem(sys.modules, module, None)  # an import that fails, as when the package is missing
    import mae_fast.attention

    monkeypatch.setattr(mae_fast.attention, "_FLASH_ATTN", {})
    assert 'pip install -e ".[fp8]"' in torchao_unavailable_reason()
    assert 'pip install -e ".[dali]"' in dali_unavailable_reason()
    assert 'pip install -e ".[flash]"' in flash_attn_unavailable_reason()


def test_the_first_progress_line_comes_within_seconds_not_only_every_log_every_steps(monkeypatch):
    import torch

    from mae_fast import progress as progress_module

    monkeypatch.setattr(progress_module, "FIRST_LINE_SECONDS", 5.0)
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 60.0)
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    progress = progress_module.Progress(total_steps=1000, start_step=0, epochs=1,
                                        device=torch.device("cpu"), is_main=False)
    progress.start_epoch(0, 0, 1000)
    assert not progress.line_due(1, log_every=100)  # right after the start
    assert progress.line_due(100, log_every=100)  # --log_every as before
    clock[0] += progress_module.FIRST_LINE_SECONDS
    assert progress.line_due(3, log_every=100)  # the run's first line, seconds after its start
    progress.batch_done(torch.tensor(1.0), 4)
    progress.log_step(3, 3, 1e-3)
    clock[0] += progress_module.FIRST_LINE_SECONDS
    assert not progress.line_due(4, log_every=100)  # then --log_every again ...
    clock[0] += progress_module.LINE_SECONDS
    assert progress.line_due(5, log_every=100)  # ... or a line when none came for a while
    several = progress_module.Progress(1000, 0, 1, torch.device("cpu"), is_main=False, world_size=2)
    several.start_epoch(0, 0, 1000)
    clock[0] += 1000
    # ranks agree without a collective: the run's first step, then every --log_every steps
    assert several.line_due(1, log_every=100) and not several.line_due(2, log_every=100)


def test_the_eta_leaves_out_the_time_before_training_and_the_first_step(monkeypatch):
    import torch

    from mae_fast import progress as progress_module

    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    progress = progress_module.Progress(total_steps=101, start_step=0, epochs=1,
                                        device=torch.device("cpu"), is_main=False)
    clock[0] += 30.0  # the model's build, a kNN at initialization
    progress.start_epoch(0, 0, 101)
    clock[0] += 10.0  # a first step that compiles
    progress.batch_done(torch.tensor(1.0), 4)
    assert progress.log_step(1, 1, 1e-3)["eta_s"] == 100 * 10.0  # its own time only, not the 30 s before
    for step in range(2, 12):
        clock[0] += 0.5  # the steps after it
        progress.batch_done(torch.tensor(1.0), 4)
    assert progress.log_step(11, 11, 1e-3)["eta_s"] == 90 * 0.5


def test_a_run_prints_its_first_step_line_before_log_every_steps(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("mae_fast.progress.FIRST_LINE_SECONDS", 0.0)
    data = write_images(tmp_path / "data", 12)  # 3 steps
    assert pretrain.main(tiny_args(data, tmp_path / "out", "--epochs", "1", "--log_every", "1000")) == 0
    steps = [line.split(" (")[0] for line in capfd.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps == ["step 1/3", "step 3/3"]


def test_the_start_line_names_the_preset_and_settings_that_run(tmp_path, caplog):
    import logging

    from mae_fast.trainer import MAETrainer

    data = write_images(tmp_path / "data", 8)
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        trainer = MAETrainer(pretrain.config_from_args(tiny_args(data, tmp_path / "out", "--epochs", "3")))
    line = trainer.describe()
    for shown in ("model mae_vit_tiny_patch16", "32px", "mask ratio 0.75", "on cpu", "batch 4", "3 epochs",
                  "8 images"):
        assert shown in line, (shown, line)
    assert not [r for r in caplog.records if "on a CPU" in r.getMessage()]  # a preset for CPUs: no warning


def test_a_large_preset_on_a_cpu_warns_once(tmp_path, caplog):
    import logging

    import torch

    from mae_fast.trainer import MAETrainer

    config = pretrain.config_from_args(["--data_path", str(tmp_path)])  # --data_path alone: the official ViT-L
    warnings = [w for w in config.warnings(torch.device("cpu")) if "on a CPU" in w]
    assert len(warnings) == 1
    assert "mae_vit_large_patch16" in warnings[0] and "224 px" in warnings[0] and "batch 64" in warnings[0]
    assert "mae_vit_tiny_patch16" in warnings[0] and "mae_vit_small_patch16" in warnings[0]
    assert not [w for w in config.warnings(torch.device("cuda", 0)) if "on a CPU" in w]
    data = write_images(tmp_path / "data", 4)
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        MAETrainer(pretrain.config_from_args(tiny_args(data, tmp_path / "out", "--model", "mae_vit_base_patch16")))
    found = [r.getMessage() for r in caplog.records if "on a CPU" in r.getMessage()]
    assert len(found) == 1 and "mae_vit_base_patch16" in found[0]


def test_the_names_the_flags_are_checked_against_are_the_ones_the_modules_run():
    from mae_fast import attention, config, fp8, model
    from mae_fast.ops import dispatch
    from mae_fast.ops.sample_mask import num_kept

    assert config.ATTN_BACKENDS == attention.ATTN_BACKENDS
    assert config.KERNEL_BACKENDS == dispatch.BACKENDS
    assert config.FP8_RECIPES == fp8.FP8_RECIPES
    assert set(config.PRESETS) == set(model.MODELS)
    for side in (2, 3, 14, 16):  # 4 to 256 patches
        for ratio in (0.01, 0.2, 0.5, 0.75, 0.8, 0.9, 0.99):
            kept = num_kept(side * side, ratio)
            try:
                config._check_patches_kept_and_masked(side * 16, 16, ratio)
                refused = False
            except ValueError:
                refused = True
            assert refused == (not 1 <= kept < side * side), (side, ratio)
