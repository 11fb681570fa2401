"""Faults found by probing: a diverging run, a full or read-only disk, a killed save, a stalled rank, Ctrl-C."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mae_fast.checkpoint as checkpoint_module
from mae_fast.checkpoint import LAST, PREV, load_checkpoint
from mae_fast.errors import NonFiniteLossError, OutputDirError
from mae_fast.pretrain import config_from_args, main
from mae_fast.trainer import MAETrainer
from helpers import tiny_args, write_images

HERE = Path(__file__).parent


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "mae_fast.pretrain: error:" in line]


def max_abs_parameter(path: Path) -> float:
    return max(v.abs().max().item() for v in load_checkpoint(path)["model"].values())


def test_a_diverged_run_names_the_checkpoint_from_before_the_loss_left_its_range(tmp_path, capsys):
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    assert main(tiny_args(data, out, "--epochs", "1", "--log_every", "100")) == 0  # a good checkpoint-0.pth
    capsys.readouterr()
    argv = tiny_args(data, out, "--epochs", "20", "--resume", "auto", "--lr", "1e6", "--save_last_every", "1",
                     "--log_every", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    # checkpoint-last.pth was rewritten after the blow-up, with parameters near 1e6: it must not be named.
    assert max_abs_parameter(out / LAST) > 1e4
    named = Path(line.split("normal range is ")[1].split(". Resume with")[0])
    assert named.name != LAST and max_abs_parameter(named) < 10
    assert named.name == "checkpoint-0.pth"  # at the same step as checkpoint-prev.pth: the one never rotated away
    assert f"--resume {named}" in line and line.count("--resume") == 1
    # The command it prints resumes from the good state.
    resumed = MAETrainer(config_from_args(tiny_args(data, out, "--epochs", "20", "--resume", str(named))))
    assert resumed.step == load_checkpoint(named)["step"]
    assert max(p.abs().max().item() for p in resumed.model.parameters()) < 10


def test_a_finite_spike_counts_as_leaving_the_normal_range(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    trainer = MAETrainer(config_from_args(tiny_args(data, out, "--epochs", "50", "--save_last_every", "1",
                                                    "--log_every", "100")))
    calls = {"n": 0}
    real_loss = type(trainer.model).forward_loss

    def spiking(self, imgs, pred, mask):
        calls["n"] += self.training  # training steps only, not the reconstruction preview at epoch ends
        loss = real_loss(self, imgs, pred, mask)
        if not self.training:
            return loss
        if calls["n"] >= 13:
            return loss * float("nan")
        return loss * 100 if calls["n"] >= 9 else loss  # steps 9-12: finite but 100x the recent mean

    monkeypatch.setattr(type(trainer.model), "forward_loss", spiking)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 13 .*left its normal range at step 9") as caught:
        trainer.fit()
    # Saved after step 7, the parameters gave the in-range loss of step 8: the newest good one.
    good = caught.value.checkpoint
    assert good is not None and load_checkpoint(good)["step"] == 7
    assert load_checkpoint(out / LAST)["step"] == 12  # written during the spike, not named
    # The rolling pair kept the last good state: checkpoint-prev.pth was not rotated away during the spike.
    assert load_checkpoint(out / PREV)["step"] == 7
    stats = load_checkpoint(out / LAST)["loss_stats"]
    assert stats["excursion_start"] == 9 and stats["normal"] < 10  # recorded at save time


def test_load_writes_never_lose_an_epoch_line_when_killed_between_save_and_log(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    real_append = MAETrainer._append_log_line

    def killed_after_saving(self, entry):
        raise KeyboardInterrupt  # the saves of epoch 0 are on disk, its log line is not

    monkeypatch.setattr(MAETrainer, "_append_log_line", killed_after_saving)
    assert main(tiny_args(data, out, "--epochs", "3")) == 130
    assert load_checkpoint(out / LAST)["epoch"] == 0 and not (out / "log.txt").exists()
    monkeypatch.setattr(MAETrainer, "_append_log_line", real_append)
    assert main(tiny_args(data, out, "--epochs", "3", "--resume", "auto")) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    real_save = torch.save
    saves = {"n": 0}

    def filling_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] >= 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", filling_disk)
    assert main(tiny_args(data, out, "--epochs", "5", "--save_last_every", "1", "--log_every", "100")) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "No space left on device" in line and str(out) in line and "intact" in line
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(out / LAST)["step"] == 2 and load_checkpoint(out / PREV)["step"] == 1
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_read_only_output_folder_is_refused_before_training(tmp_path, monkeypatch, capsys):
    data = write_images(tmp_path / "data", 8)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", read_only)
    started = []
    monkeypatch.setattr(MAETrainer, "fit", lambda self: started.append(1))
    assert main(tiny_args(data, tmp_path / "out")) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "--output_dir" in line and str(tmp_path / "out") in line and "Read-only file system" in line
    assert not started


def test_a_folder_without_write_permission_is_refused_before_training(tmp_path, monkeypatch, capsys):
    # What creating a file in a folder one may not write raises (EACCES), injected at the write probe's call so that
    # the test runs as root too, who writes anywhere.
    data = write_images(tmp_path / "data", 8)
    out = tmp_path / "out"

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, ".mae_fast-write-test-x"))

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", denied)
    with pytest.raises(OutputDirError, match=re.escape(f"--output_dir '{out}' cannot be written: Permission denied")):
        checkpoint_module.check_writable(out)
    started = []
    monkeypatch.setattr(MAETrainer, "fit", lambda self: started.append(1))
    assert main(tiny_args(data, out)) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert "--output_dir" in line and str(out) in line and "Permission denied" in line
    assert not started


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders without write permission; "
                                              "test_a_folder_without_write_permission_is_refused_before_training "
                                              "injects the error instead")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="Permission denied"):
            checkpoint_module.check_writable(folder)
    finally:
        folder.chmod(0o755)


def test_temporaries_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    data = write_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".checkpoint-last.pth.tmp-12345"
    stale.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp-1"
    keep.write_text("not ours")
    MAETrainer(config_from_args(tiny_args(data, out)))
    assert not stale.exists() and keep.exists()


def test_ctrl_c_prints_one_line_with_the_resume_command_and_exits_130(tmp_path):
    data = write_images(tmp_path / "data", 32)
    out = tmp_path / "out"
    args = tiny_args(data, out, "--epochs", "50", "--save_last_every", "2", "--log_every", "100")
    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not (out / LAST).is_file():
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    [line] = [line for line in err.splitlines() if "interrupted" in line]
    assert line.startswith("mae_fast.pretrain: interrupted at step ")
    assert "last good checkpoint" in line and str(out) in line
    assert line.endswith("--resume auto") and line.count("--resume") == 1
    assert "python -m mae_fast.pretrain --data_path" in line


class Lines:
    """A process's stdout and stderr lines as they come (read by threads, so the test can wait for one)."""

    def __init__(self, proc):
        import threading

        self.out, self.err = [], []
        for stream, lines in ((proc.stdout, self.out), (proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, l=lines: [l.append(line) for line in s], daemon=True).start()

    def wait_for(self, text: str, where: str = "out", timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in getattr(self, where)):
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never came; stderr: {''.join(self.err)[-2000:]}")


def press_ctrl_c(proc) -> None:
    """What Ctrl-C in a terminal does: SIGINT to the whole process group (the loader's workers too)."""
    os.killpg(proc.pid, signal.SIGINT)


def test_the_first_ctrl_c_saves_the_current_step_and_the_run_resumes_there_exactly(tmp_path):
    data = write_images(tmp_path / "data", 32)  # 8 batches an epoch; checkpoint-last.pth only at epoch ends
    out = tmp_path / "out"
    args = tiny_args(data, out, "--epochs", "50", "--num_workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "mae_fast.pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    lines = Lines(proc)
    try:
        lines.wait_for("step 11/")  # in the middle of the second epoch
        press_ctrl_c(proc)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    err = "".join(lines.err)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    state = load_checkpoint(out / LAST)
    step = state["step"]
    assert step >= 11 and state["epoch"] == step // 8 and state["step_in_epoch"] == step % 8 != 0
    [line] = [line for line in err.splitlines() if "interrupted" in line]
    assert f"interrupted at step {step}/" in line and f"wrote {out / LAST} at this step" in line
    assert line.rstrip().endswith("--resume auto")
    # Resumed, it trains on exactly as the uninterrupted run does.
    resumed = MAETrainer(config_from_args(tiny_args(data, out, "--epochs", "50", "--resume", "auto",
                                                    "--max_steps", str(step + 2))))
    assert resumed.step == step
    resumed.fit()
    straight = MAETrainer(config_from_args(tiny_args(data, tmp_path / "straight", "--epochs", "50",
                                                     "--max_steps", str(step + 2))))
    straight.fit()
    assert [v for _, v in resumed.history] == pytest.approx([v for _, v in straight.history[-2:]], rel=1e-6)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    data = write_images(tmp_path / "data", 64)
    out = tmp_path / "out"
    args = tiny_args(data, out, "--epochs", "50", "--num_workers", "2")
    proc = subprocess.Popen([sys.executable, str(HERE / "slow_save_worker.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    lines = Lines(proc)
    try:
        lines.wait_for("step 3/")
        press_ctrl_c(proc)
        lines.wait_for("saving", where="err")  # the save of the current step is under way (and takes a minute)
        pressed = time.time()
        press_ctrl_c(proc)
        proc.wait(timeout=30)
        stopped_after = time.time() - pressed
    finally:
        proc.kill()
        proc.wait()
    err = "".join(lines.err)
    assert proc.returncode == 130, err[-3000:]
    assert stopped_after < 10
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "interrupted again" in line]
    assert "stopped at once" in line and "--resume auto" in line
    assert not (out / LAST).exists()


def shard_with_bad_first_members(path: Path, count: int = 12) -> Path:
    """A shard whose first two members do not decode (one garbage, one a JPEG cut in the middle), then good ones."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
            data = buffer.getvalue()
            if i == 0:
                data = b"\xff\xd8\xff" + bytes(200) + b"\xff\xd9"  # signature and end marker, nothing inside
            elif i == 1:
                data = data[:100] + data[-2:]
            info = tarfile.TarInfo(f"s{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.parent


def test_undecodable_images_first_in_the_training_and_validation_shards_never_stop_the_run(tmp_path):
    train = shard_with_bad_first_members(tmp_path / "train" / "shard-000000.tar")
    val = shard_with_bad_first_members(tmp_path / "val" / "shard-000000.tar")
    out = tmp_path / "out"
    assert main(tiny_args(train, out, "--val_path", str(val), "--epochs", "1", "--log_every", "100")) == 0
    assert (out / "reconstruction-epoch0.png").is_file() and (out / "checkpoint-0.pth").is_file()
    trainer = MAETrainer(config_from_args(tiny_args(train, tmp_path / "again", "--val_path", str(val))))
    assert trainer._preview_images().shape[0] == 8  # the first eight that decode


def test_the_preview_of_a_folder_skips_images_that_do_not_decode(tmp_path, monkeypatch):
    import mae_fast.data.files

    data = write_images(tmp_path / "data", 10)
    trainer = MAETrainer(config_from_args(tiny_args(data, tmp_path / "out")))
    real_open = mae_fast.data.files.open_rgb
    first = sorted(str(p) for p in data.iterdir())[0]

    def failing_first(source):
        if str(source) == first:
            raise OSError("image file is truncated")
        return real_open(source)

    monkeypatch.setattr(mae_fast.data.files, "open_rgb", failing_first)
    assert trainer._preview_images().shape[0] == 8
    monkeypatch.setattr(mae_fast.data.files, "open_rgb", lambda source: (_ for _ in ()).throw(OSError("gone")))
    assert trainer._preview_images() is None  # none decodes: no preview, and no error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stalled_rank_stops_the_job_after_the_collective_timeout(tmp_path):
    data = write_images(tmp_path / "data", 32)
    args = tiny_args(data, tmp_path / "out", "--epochs", "5", "--dist_timeout", "5")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "stall_worker.py"), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    try:
        _, err = procs[0].communicate(timeout=180)  # rank 1 stops itself at its third batch
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert procs[0].returncode == 1, err[-3000:]
    [line] = error_lines(err)
    assert "--dist_timeout 5 s" in line and "Traceback" not in err


def test_ctrl_c_during_a_save_lands_after_the_checkpoint_is_complete(tmp_path, monkeypatch):
    # Under Python's own SIGINT handler, as in a plain script (a library loaded by an earlier test in the same process
    # may have installed another one, which the save rightly leaves in place).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the file is half written
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", interrupted_save)
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "epoch": 0, "step": 5}
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint_module.save_checkpoint(state, tmp_path / LAST)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_checkpoint(tmp_path / LAST)["step"] == 5
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_checkpoint_last_exists_at_every_instant_of_a_rotating_save(tmp_path, monkeypatch):
    # A kill just before the final rename: the previous checkpoint-last.pth must still be there (and kept as prev).
    def state(step):
        return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "epoch": 0, "step": step}

    checkpoint_module.save_checkpoint(state(1), tmp_path / LAST)
    real_replace = os.replace

    def killed_before_the_last_rename(src, dst):
        if str(dst).endswith(LAST):
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed_before_the_last_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.save_checkpoint(state(2), tmp_path / LAST, keep_previous_as=tmp_path / PREV)
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert load_checkpoint(tmp_path / LAST)["step"] == 1 and load_checkpoint(tmp_path / PREV)["step"] == 1
    checkpoint_module.save_checkpoint(state(3), tmp_path / LAST, keep_previous_as=tmp_path / PREV)
    assert load_checkpoint(tmp_path / LAST)["step"] == 3 and load_checkpoint(tmp_path / PREV)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_run_that_diverges_at_its_second_step_is_reported_and_never_named_good(tmp_path, capsys):
    # --lr 10 without warmup: the loss jumps by millions at step 2 and stays far above its start.
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    assert main(tiny_args(data, out, "--lr", "10", "--warmup_epochs", "0", "--save_last_every", "1",
                          "--log_every", "100")) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err and "done:" not in err
    assert "left its normal range at step 2" in line and "still out of it when the run ended at step 8" in line
    assert "--lr" in line  # what would work
    for path in (out / LAST, out / "checkpoint-1.pth"):
        stats = load_checkpoint(path)["loss_stats"]
        assert stats["excursion_start"] == 2  # written during the excursion, recorded as such
    assert not (out / PREV).exists()  # no checkpoint-last.pth was ever good enough to keep
    assert "none" in line.split("normal range is ")[1]
