"""The README's code runs as written, and its commands say what they do."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_its_python_examples():
    assert len(PYTHON_BLOCKS) >= 2
    assert any("mae_fast.ops import" in block for block in PYTHON_BLOCKS)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_each_python_block_runs_as_written_on_a_cpu(tmp_path, index):
    script = tmp_path / f"block{index}.py"
    script.write_text(PYTHON_BLOCKS[index])
    # As a user runs it: a fresh process in an empty folder, no test-suite settings (Triton interpreter off).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def section(title: str) -> str:
    return README.split(title, 1)[1].split("\n## ", 1)[0]


def sentence_with(pattern: str, text: str) -> str:
    """The sentence of ``text`` (the README wraps its lines) in which ``pattern`` matches."""
    match = re.search(pattern, text)
    assert match, pattern
    start = max(text.rfind(". ", 0, match.start()), text.rfind("\n\n", 0, match.start()))
    end = text.find(". ", match.end())
    return " ".join(text[start + 1:end if end >= 0 else None].split())


def test_the_quick_start_and_the_probe_state_their_times_with_the_machine_and_its_load():
    quick_start = section("## Quick start")
    assert "python -m mae_fast.pretrain" in quick_start
    claim = sentence_with(r"took \d+ min \d+ s", quick_start)
    assert "2-core" in claim and "no GPU" in claim and re.search(r"busy|quiet", claim), claim
    probe = sentence_with(r"the probe took \d+ s", README)
    assert "2-core" in probe and re.search(r"busy|quiet", probe), probe


TEST_COMMAND = next(line.strip() for line in README.splitlines()
                    if "&& pytest tests -rs" in line and "&& pytest bench" in line)


def test_the_cuda_build_is_announced_before_the_test_command_with_how_to_see_its_progress():
    before = README[:README.index(TEST_COMMAND)].split("## Quick start", 1)[1]
    said = sentence_with(r"compiles the CUDA ops", before)
    assert "only where they can run" in said and "a GPU is visible" in said, said
    said = sentence_with(r"`torch.cuda.is_available\(\)`", before)
    assert "only asks the driver" in said, said
    said = sentence_with(r"To build without a GPU", before)
    assert "MAE_FAST_FORCE_CUDA_BUILD=1" in said and "GPU-less node for a GPU cluster" in said, said
    assert re.search(r"\d+ min", said) and "still" in said, said
    assert "pip install -v" in TEST_COMMAND  # pip shows the build's output, a line per compiled file, only with -v
    assert "MAE_FAST_SKIP_CUDA_BUILD" not in TEST_COMMAND and "MAE_FAST_FORCE_CUDA_BUILD" not in TEST_COMMAND


def test_ci_runs_the_readme_command_with_the_cuda_build_forced_and_fails_when_a_test_fails(tmp_path):
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci  # CI runs what the README tells a user to run ...
    said = sentence_with(r"CI \(`\.ci/run`\)", README)
    assert "MAE_FAST_FORCE_CUDA_BUILD=1 MAE_FAST_CUDA_ARCHS=90" in said and "fails when any test fails" in said, said
    # ... run here with stand-ins for python3, pip and pytest on a copy of the script: pip records the variables
    # the install sees, and `pytest tests` fails as a failing test makes it fail.
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    scripts = {
        "python3": f'mkdir -p .venv/bin && echo "export PATH={stand_ins}:\\$PATH" > .venv/bin/activate',
        "pip": 'echo "$* FORCE=${MAE_FAST_FORCE_CUDA_BUILD:-} ARCHS=${MAE_FAST_CUDA_ARCHS:-}" >> pip.log',
        "pytest": 'echo "$*" >> pytest.log; [ "$1" != tests ] || exit "${TESTS_EXIT:-0}"',
    }
    for name, body in scripts.items():
        (stand_ins / name).write_text(f"#!/bin/bash\n{body}\n")
        (stand_ins / name).chmod(0o755)
    env = {"PATH": f"{stand_ins}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for exit_code in (0, 1):
        for log in ("pip.log", "pytest.log"):
            (tmp_path / log).unlink(missing_ok=True)
        run = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env={**env, "TESTS_EXIT": str(exit_code)},
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == exit_code, run.stderr
        installs = (tmp_path / "pip.log").read_text().splitlines()
        assert installs[-1].startswith("install -v --no-build-isolation -e") and \
            installs[-1].endswith("FORCE=1 ARCHS=90"), installs
        ran = (tmp_path / "pytest.log").read_text().splitlines()
        tests = "tests -rs -n 2 --dist loadfile"
        assert ran == ([tests, "bench --benchmark-disable"] if exit_code == 0 else [tests]), ran


def test_brace_patterns_are_quoted_as_the_shell_needs_them():
    import ast
    import importlib

    from mae_fast.config import DataConfig, field_docs

    texts = {"README.md": README, "--data_path's help": field_docs(DataConfig)["data_path"],
             "bench/README.md": (ROOT / "bench" / "README.md").read_text()}
    for command in ("pretrain", "prepare", "linprobe", "export", "info"):
        texts[f"{command} --help"] = importlib.import_module(f"mae_fast.{command}").build_parser().format_help()
    for module in sorted((ROOT / "mae_fast").rglob("*.py")):  # the modules' own documentation
        texts[str(module.relative_to(ROOT))] = ast.get_docstring(ast.parse(module.read_text())) or ""
    found = 0
    for where, text in texts.items():
        for pattern in re.findall(r"\S*\{\d+\.\.\d+\}\S*", text):
            found += 1
            # unquoted, bash expands it into one argument per name
            assert re.match(r"[(`]*'", pattern), f"{where}: {pattern}"
    assert found >= 3


def test_the_readme_says_where_the_logs_and_the_built_in_set_go_and_which_decoder_runs(monkeypatch, tmp_path):
    from mae_fast.config import RunConfig
    from mae_fast.data import builtin, dali_loader, resolve_data_backend

    assert "tensorboard --logdir output_dir" in README and RunConfig().log_dir == RunConfig().output_dir
    said = sentence_with(r"`MAE_FAST_CACHE`", section("## Quick start"))
    assert "built-in image set" in said and "~/.cache/mae_fast" in said, said
    monkeypatch.setenv("MAE_FAST_CACHE", str(tmp_path))
    assert builtin.default_cache_dir() == tmp_path
    said = sentence_with(r'pip install -e "\.\[dali\]"', README)
    assert "CUDA 13" in said, said
    assert 'dali = ["nvidia-dali-cuda130"]' in (ROOT / "pyproject.toml").read_text()
    said = sentence_with(r"switches `--data_backend auto`", README)
    assert "demo" in said and "--data_backend torch" in said, said
    monkeypatch.setattr(dali_loader, "dali_unavailable_reason", lambda: None)  # DALI importable
    assert resolve_data_backend("auto") == "dali"


def test_the_prediction_column_is_explained_and_the_loss_leaves_visible_patches_untrained():
    import torch

    from mae_fast import create_model

    said = sentence_with(r"visible patches look like noise", README)
    assert "prediction" in said and "masked patches" in said, said
    model = create_model("mae_vit_tiny_patch16", img_size=32, kernel_backend="torch")
    images = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = model.forward_encoder(images, 0.5)
    pred = model.forward_decoder(latent, ids_restore).detach().requires_grad_()
    model.forward_loss(images, pred, mask).backward()
    visible = mask == 0
    assert visible.any() and (pred.grad[visible] == 0).all() and (pred.grad[~visible] != 0).any()


def test_the_test_command_shows_skip_reasons_and_the_readme_names_the_note_a_skipped_build_leaves():
    from mae_fast.ops import dispatch

    assert TEST_COMMAND.split(" && pytest bench")[0].endswith("pytest tests -rs -n 2 --dist loadfile")
    said = sentence_with(r"A skipped build leaves", README)
    assert f"`mae_fast/{dispatch.CUDA_BUILD_SKIPPED_FILE}`" in said and "no GPU was visible" in said, said
    assert "MAE_FAST_SKIP_CUDA_BUILD=1" in said, said
    # What setup.py leaves, and how the extension test reads it: tests/ops/test_cuda_extension.py.


def test_the_step_line_shown_in_the_readme_is_the_trainers_format():
    from mae_fast.progress import format_duration

    shown = next(line.strip() for line in README.splitlines() if line.strip().startswith("step 120/640"))
    assert re.fullmatch(r"step \d+/\d+ \(epoch \d+/\d+, batch \d+/\d+\): loss [\d.]+, lr [\d.e-]+, [\d,]+ images/s, "
                        r"data wait \d+%, ETA \w+", shown)
    assert shown.endswith(format_duration(65))


def test_when_progress_lines_come_is_what_the_trainer_does():
    from mae_fast.progress import FIRST_LINE_SECONDS, LINE_SECONDS

    said = sentence_with(r"the first step that ends \d+ s or more after the start", README)
    assert f"ends {FIRST_LINE_SECONDS:g} s or more" in said and f"after {LINE_SECONDS:g} s without a line" in said


def _commands(prefix: str) -> list[str]:
    """The README's shell commands that start with ``prefix`` (continuation lines joined)."""
    lines, commands = README.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip().startswith(prefix):
            command = line.strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            commands.append(command)
    return commands


def test_the_export_and_linear_probe_commands_run_as_written_after_the_quick_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MAE_FAST_CACHE")}
    # The quick start's run, cut short: it leaves output_dir/checkpoint-last.pth as the full one does.
    quick = subprocess.run([sys.executable, "-m", "mae_fast.pretrain", "--epochs", "1", "--max_steps", "2",
                            "--num_workers", "0", "--data_backend", "torch"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert quick.returncode == 0, quick.stderr[-3000:]
    commands = _commands("python -m mae_fast.export") + _commands("python -m mae_fast.linprobe")
    assert len(commands) == 4
    for command in commands:
        run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, (command, run.stderr[-3000:])
    assert (tmp_path / "encoder.pth").is_file() and (tmp_path / "weights.safetensors").is_file()
    assert (tmp_path / "vit_mae_hf" / "config.json").is_file()
    assert (tmp_path / "linprobe" / "results.json").is_file()


def test_the_shard_commands_run_as_written_on_a_small_folder(tmp_path):
    # /data/imagenet stands for a small folder here; the torchrun command's flags are parsed as written, then
    # run shortened (a later flag overrides an earlier one).
    from PIL import Image

    from mae_fast.pretrain import config_from_args

    data = tmp_path / "imagenet" / "train"
    for i in range(12):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (20 * i, 100, 200 - 10 * i)).save(data / f"c{i % 2}" / f"{i}.JPEG")
    section = README.split("### Data at scale", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    prepare = next(c for c in _commands("python -m mae_fast.prepare") if c in section.replace("\\\n", ""))
    run = subprocess.run(["bash", "-c", prepare.replace("/data/", f"{tmp_path}/")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "imagenet-shards" / "manifest.json").is_file()
    train = next(c for c in _commands("torchrun") if "imagenet-shards" in c)
    args = train.replace("/data/", f"{tmp_path}/").split("-m mae_fast.pretrain", 1)[1].split()
    config = config_from_args(args)
    assert config.data.data_path.endswith("imagenet-shards") and config.model.name == "mae_vit_large_patch16"
    short = args + ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "4", "--accum_iter", "1",
                    "--epochs", "1", "--max_steps", "2", "--device", "cpu", "--data_backend", "torch",
                    "--num_workers", "0", "--output_dir", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "mae_fast.pretrain", *short], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint-last.pth").is_file()


def test_the_self_test_table_shown_is_its_format():
    from mae_fast.selfcheck import TABLE_HEADER

    lines = [line.strip() for line in README.splitlines()]
    header = lines.index(TABLE_HEADER.splitlines()[0])
    assert lines[header + 1] == TABLE_HEADER.splitlines()[1]
    rows = lines[header + 2:lines.index("", header)]
    assert rows and all(re.fullmatch(r"\| [^|]+ \| \w+ \| \w+ \| [-\d.e]+ \| [-\d.e]+ \| (OK|FAIL|SKIP) \| [\d.]+s \|.*\|",
                                     row) for row in rows), rows


def test_the_multi_node_restart_command_asks_torchrun_for_a_fresh_store_per_restart():
    from mae_fast.distributed import FRESH_STORE_ENV

    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if "--max_restarts" in line and line.strip().startswith("torchrun"))
    assert lines[start - 1].strip().startswith(f"export {FRESH_STORE_ENV}=1"), lines[start - 1]
    assert "--nnodes" in lines[start]

def test_the_fine_tuning_demo_commands_parse_as_the_table_says(tmp_path, monkeypatch):
    import shlex

    from mae_fast.finetune import config_from_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "output_dir").mkdir()
    (tmp_path / "output_dir" / "checkpoint-last.pth").write_bytes(b"")  # the quick start's (only its existence counts)
    section = README.split("**The demo: does pretraining help?**", 1)[1].split("\n## ", 1)[0]
    demo, scratch = [shlex.split(line.split("#")[0])[3:] for line in section.splitlines()
                     if line.strip().startswith("python -m mae_fast.finetune")]
    pretrained, random_start = config_from_args(demo), config_from_args(scratch)
    assert pretrained.model.finetune == "./output_dir/checkpoint-last.pth" and random_start.model.finetune == ""
    for config in (pretrained, random_start):
        assert (config.aug.hflip, config.aug.auto_augment, config.optim.layer_decay, config.epochs) == \
            (0.0, None, 0.75, 10)
        assert (config.model.name, config.data.input_size) == ("vit_tiny_patch16", 64)
    assert "`--hflip 0 --aa none`" in section and "10 epochs" in section and "64 px" in section
