"""Faults of the disk and of the data source during a run: a save that fills the disk inside torch.save, a pipe:
shard whose command keeps failing."""

import errno
import os

import mae_fast.checkpoint as checkpoint_module
import mae_fast.data.shards as shards
from mae_fast.checkpoint import LAST, PREV, load_checkpoint
from mae_fast.pretrain import main
from mae_fast.trainer import MAETrainer
from helpers import tiny_args, write_images


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "mae_fast.pretrain: error:" in line]


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (torch.save's writer calls ``write``)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_disk_filling_up_inside_torch_save_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch,
                                                                                           capsys):
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    opened = {"n": 0}

    def filling_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        opened["n"] += 1
        return _FullDisk(f, 1 << 40 if opened["n"] < 3 else 4096)  # the third save runs out of space mid-file

    monkeypatch.setattr(checkpoint_module, "open", filling_disk, raising=False)
    assert main(tiny_args(data, out, "--epochs", "5", "--save_last_every", "1", "--log_every", "100")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    [line] = error_lines(err)
    assert "No space left on device" in line and str(out) in line and "intact" in line
    monkeypatch.delattr(checkpoint_module, "open")
    assert load_checkpoint(out / LAST)["step"] == 2 and load_checkpoint(out / PREV)["step"] == 1
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]



def test_a_shard_command_that_keeps_failing_stops_the_run_with_a_checkpoint_and_the_resume_command(
        tmp_path, monkeypatch, capsys):
    import json

    from mae_fast.prepare import prepare

    monkeypatch.setattr(shards, "RETRY_DELAYS", (0.0, 0.0))
    source = write_images(tmp_path / "images", 16)
    prepare(str(source), str(tmp_path / "set"), max_side=40, shard_size=12_000, workers=1)
    paths = sorted((tmp_path / "set").glob("shard-*.tar"))
    assert len(paths) >= 2
    down = tmp_path / "network-down"
    fetch = tmp_path / "fetch.sh"
    fetch.write_text(f'if [ -e {down} ]; then echo "connection reset" >&2; exit 1; fi\ncat "$1"\n')
    listing = tmp_path / "train.txt"  # the first shard (read for the reconstruction preview) always works
    listing.write_text(f"pipe:cat {paths[0]}\n" + "".join(f"pipe:sh {fetch} {p}\n" for p in paths[1:]))
    real_end_epoch = MAETrainer.end_epoch

    def network_fails_after_the_first_epoch(self, stats):
        result = real_end_epoch(self, stats)
        down.touch()
        return result

    monkeypatch.setattr(MAETrainer, "end_epoch", network_fails_after_the_first_epoch)
    argv = tiny_args(listing, tmp_path / "out", "--epochs", "3", "--log_every", "100")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    [line] = error_lines(err)
    last = tmp_path / "out" / LAST
    assert "the command exited with status 1: connection reset (3 attempts)" in line
    assert f"--resume {last}" in line and line.count("--resume") == 1
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and state["step_in_epoch"] < 4  # saved in the second epoch, where it stopped
    down.unlink()
    monkeypatch.setattr(MAETrainer, "end_epoch", real_end_epoch)
    resume = line.split("Resume with: ")[1].split()
    assert resume[:3] == ["python", "-m", "mae_fast.pretrain"]
    assert main(resume[3:]) == 0
    epochs = [json.loads(entry)["epoch"] for entry in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_a_shard_member_dali_cannot_decode_does_not_stop_the_run(tmp_path, capsys):
    import io
    import tarfile

    import pytest

    from mae_fast.data import dali_unavailable_reason

    if dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    images = sorted(write_images(tmp_path / "images", 12).glob("*.jpg"))
    (tmp_path / "set").mkdir()
    with tarfile.open(tmp_path / "set" / "shard-000000.tar", "w") as tar:
        for i, path in enumerate(images):
            data = bytearray(path.read_bytes())
            if i == 10:  # its start and end markers intact, its tables zeroed: only a decode finds it
                data[20:200] = bytes(180)
            info = tarfile.TarInfo(f"s{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(bytes(data)))
    out = tmp_path / "out"
    assert main(tiny_args(tmp_path / "set", out, "--data_backend", "dali", "--epochs", "2")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and not error_lines(err)
    assert load_checkpoint(out / LAST)["epoch"] == 1
