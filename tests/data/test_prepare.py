"""python -m mae_fast.prepare: shards, index files and manifest; unreadable files listed; stop and re-run."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from mae_fast import prepare as prep
from mae_fast.config import DataConfig
from mae_fast.data import build_loader
from mae_fast.data.shards import load_shard_set, read_index, stream_images
from mae_fast.errors import ConfigError
from image_files import color_number, number_color


def write_source(folder, count=30, size=(120, 90)):
    """An ImageNet-style folder: two classes of solid images (image i has number_color(i)), plus two bad files."""
    for i in range(count):
        cls = folder / "train" / f"class_{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, number_color(i)).save(cls / f"img_{i:03d}.png")
    (folder / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (folder / "train" / "class_1" / "empty.png").write_bytes(b"")
    return folder


def shard_bytes(dst):
    return {p.name: p.read_bytes() for p in sorted(dst.glob("shard-*.tar"))}


def test_prepare_writes_shards_indexes_and_a_manifest(tmp_path):
    src = write_source(tmp_path / "src")
    dst = tmp_path / "dst"
    manifest = prep.prepare(str(src), str(dst), max_side=64, quality=90, shard_size=20_000, workers=2)
    shards = sorted(dst.glob("shard-*.tar"))
    assert len(shards) >= 3 and manifest["complete"] and manifest["images"] == 30
    assert [s["name"] for s in manifest["shards"]] == [p.name for p in shards]
    assert json.loads((dst / "manifest.json").read_text()) == manifest
    assert manifest["settings"] == {"max_side": 64, "quality": 90, "shard_size": 20_000, "seed": 0}
    assert {s["path"].rsplit("/", 1)[-1] for s in manifest["skipped"]} == {"broken.jpg", "empty.png"}
    assert "broken.jpg" in (dst / "skipped.txt").read_text()
    colors = []
    for record, path in zip(manifest["shards"], shards):
        assert read_index(str(path)) == record["count"]  # DALI's index file beside each shard
        images = list(stream_images(str(path)))
        assert len(images) == record["count"]
        for image in images:
            img = Image.open(io.BytesIO(image.data))
            assert img.format == "JPEG" and min(img.size) == 64 and img.size == (85, 64)  # shorter side resized
            colors.append(color_number(img.convert("RGB").getpixel((30, 30))))
    assert sorted(colors) == list(range(30))  # every readable image once
    assert colors != sorted(colors)  # in a shuffled order
    assert not list(dst.glob("*.tmp-*"))


def test_the_prepared_set_trains_with_the_same_flags(tmp_path):
    src = write_source(tmp_path / "src", count=12)
    dst = tmp_path / "dst"
    prep.prepare(str(src), str(dst), max_side=32, shard_size=4_000, workers=1)
    assert load_shard_set(str(dst)).num_samples == 12
    cfg = DataConfig(data_path=str(dst), backend="torch", input_size=16, batch_size=5, num_workers=0)
    seen = [i for _, indices in build_loader(cfg, 0, 1, "cpu", 0).epoch(0) for i in indices.tolist() if i >= 0]
    assert sorted(seen) == list(range(12))


def test_a_stopped_run_finishes_on_the_next_and_keeps_complete_shards(tmp_path, monkeypatch):
    src = write_source(tmp_path / "src")
    fresh = tmp_path / "fresh"
    prep.prepare(str(src), str(fresh), max_side=48, shard_size=10_000, workers=1)
    dst = tmp_path / "dst"
    real_encode = prep.encode
    calls = {"n": 0}

    def stop_at_20(item):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real_encode(item)

    monkeypatch.setattr(prep, "encode", stop_at_20)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(src), str(dst), max_side=48, shard_size=10_000, workers=1)
    partial = json.loads((dst / "manifest.json").read_text())
    assert not partial["complete"] and partial["shards"]
    assert not list(dst.glob("*.tmp-*"))  # the shard being written was not left behind, under any name
    assert set(shard_bytes(dst)) == {s["name"] for s in partial["shards"]}
    kept = {s["name"]: (dst / s["name"]).stat().st_mtime_ns for s in partial["shards"]}
    monkeypatch.setattr(prep, "encode", real_encode)
    done = prep.prepare(str(src), str(dst), max_side=48, shard_size=10_000, workers=1)
    assert done["complete"] and shard_bytes(dst) == shard_bytes(fresh)  # the same set as one uninterrupted run
    assert all((dst / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # not rewritten
    # A completed shard that changed is written again.
    first = sorted(dst.glob("shard-*.tar"))[0]
    first.write_bytes(first.read_bytes()[:-1024])
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["complete"] = False
    (dst / "manifest.json").write_text(json.dumps(manifest))
    prep.prepare(str(src), str(dst), max_side=48, shard_size=10_000, workers=1)
    assert shard_bytes(dst) == shard_bytes(fresh)


def test_mistakes_end_in_one_line(tmp_path, capsys):
    src = write_source(tmp_path / "src", count=4)
    dst = tmp_path / "dst"
    assert prep.main([str(src), str(dst), "--max_side", "32", "--workers", "1"]) == 0
    assert prep.main([str(src), str(dst), "--max_side", "48"]) == 2  # other settings into the same folder
    assert "prepared from another source, other settings" in capsys.readouterr().err
    assert prep.main([str(src), str(tmp_path / "x"), "--shard_size", "lots"]) == 2
    assert "--shard_size must be a positive size" in capsys.readouterr().err
    assert prep.main([str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--quality must be an integer in"):
        prep.prepare(str(src), str(tmp_path / "z"), quality=0)
    assert prep.parse_size("256MB") == 256 << 20 and prep.parse_size("1.5GiB") == 3 << 29


def test_a_val_folder_beside_train_is_named_and_not_packed(tmp_path, caplog):
    import logging

    src = write_source(tmp_path / "src", count=4)
    val = src / "val" / "class_0"
    val.mkdir(parents=True)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(val / "v.png")
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        manifest = prep.prepare(str(src), str(tmp_path / "dst"), max_side=32, workers=1)
    assert manifest["images"] == 4  # train/ only
    said = [r.getMessage() for r in caplog.records if "not packed" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"prepare: {src / 'val'} is not packed") and "--val_path" in said[0]
    assert f"python -m mae_fast.prepare {src / 'val'} {tmp_path / 'dst'}-val" in said[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        prep.prepare(str(src / "train"), str(tmp_path / "dst2"), max_side=32, workers=1)
    assert not [r for r in caplog.records if "not packed" in r.getMessage()]


def folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_folder_holding_files_prepare_did_not_write_is_refused_and_left_as_it_was(tmp_path, capsys):
    src = write_source(tmp_path / "src", count=6)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "shard-000000.tar").write_bytes(b"someone's shard")
    (dst / "shard-000005.tar").write_bytes(b"another")
    (dst / "notes.tmp-1").write_text("not a temporary of prepare")
    before = folder_state(dst)
    assert prep.main([str(src), str(dst), "--max_side", "32", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "holds files prepare did not write" in err and any(name in err for name in before)
    assert folder_state(dst) == before  # nothing removed, nothing overwritten


def test_beside_its_own_set_prepare_touches_only_what_its_manifest_names(tmp_path, capsys, monkeypatch):
    src = write_source(tmp_path / "src")
    dst = tmp_path / "dst"
    real_encode = prep.encode
    calls = {"n": 0}

    def stop_at_20(item):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real_encode(item)

    monkeypatch.setattr(prep, "encode", stop_at_20)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(src), str(dst), max_side=48, shard_size=10_000, workers=1)
    monkeypatch.setattr(prep, "encode", real_encode)
    listed = json.loads((dst / "manifest.json").read_text())["shards"]
    foreign = dst / f"shard-{len(listed) + 1:06d}.tar"  # where the resumed run would write next
    foreign.write_bytes(b"not written by prepare")
    (dst / "notes.txt").write_text("mine")
    before = folder_state(dst)
    assert prep.main([str(src), str(dst), "--max_side", "48", "--shard_size", "10000", "--workers", "1"]) == 2
    assert "holds files prepare did not write" in capsys.readouterr().err
    assert folder_state(dst) == before
    foreign.unlink()
    (dst / "notes.txt").unlink()
    assert prep.prepare(str(src), str(dst), max_side=48, shard_size=10_000, workers=1)["complete"]


def test_temporaries_of_a_killed_run_are_removed_and_a_live_ones_refused(tmp_path, capsys):
    import os
    import subprocess
    import sys

    src = write_source(tmp_path / "src", count=6)
    fresh = tmp_path / "fresh"
    prep.prepare(str(src), str(fresh), max_side=32, workers=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dst = tmp_path / "dst"
    dst.mkdir()
    stale = dst / f".shard-000000.tar.prepare.tmp-{int(dead.stdout)}"  # a kill -9 in the first shard
    stale.write_bytes(b"half a shard")
    assert prep.prepare(str(src), str(dst), max_side=32, workers=1)["complete"]
    assert not stale.exists() and shard_bytes(dst) == shard_bytes(fresh)
    other = tmp_path / "other"
    other.mkdir()
    live = other / f".shard-000000.tar.prepare.tmp-{os.getppid()}"  # a running process: another prepare's
    live.write_bytes(b"being written")
    assert prep.main([str(src), str(other), "--max_side", "32", "--workers", "1"]) == 2
    assert f"process {os.getppid()}" in capsys.readouterr().err and live.read_bytes() == b"being written"


def test_a_kill_between_a_shards_rename_and_the_manifest_update_resumes(tmp_path, monkeypatch):
    src = write_source(tmp_path / "src")
    fresh = tmp_path / "fresh"
    prep.prepare(str(src), str(fresh), max_side=48, shard_size=10_000, workers=1)
    dst = tmp_path / "dst"
    real_finish = prep.ShardWriter.finish
    finished = {"n": 0}

    def killed_after_the_rename(self):
        record = real_finish(self)
        finished["n"] += 1
        if finished["n"] == 2:
            raise KeyboardInterrupt  # the shard has its final name; the manifest does not list it yet
        return record

    monkeypatch.setattr(prep.ShardWriter, "finish", killed_after_the_rename)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(src), str(dst), max_side=48, shard_size=10_000, workers=1)
    assert len(json.loads((dst / "manifest.json").read_text())["shards"]) == 1 and (dst / "shard-000001.tar").exists()
    monkeypatch.setattr(prep.ShardWriter, "finish", real_finish)
    assert prep.prepare(str(src), str(dst), max_side=48, shard_size=10_000, workers=1)["complete"]
    assert shard_bytes(dst) == shard_bytes(fresh)


class FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (a disk filling up)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        import errno
        import os

        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_is_one_line_keeps_the_complete_shards_and_resumes(tmp_path, capsys, monkeypatch):
    src = write_source(tmp_path / "src")
    fresh = tmp_path / "fresh"
    prep.prepare(str(src), str(fresh), max_side=48, shard_size=10_000, workers=1)
    dst = tmp_path / "dst"
    real_open = tarfile.open
    opened = {"n": 0}

    def filling(name=None, mode="r", **kwargs):
        if not mode.startswith("w"):  # shards read back (to index them) open as usual
            return real_open(name, mode, **kwargs)
        opened["n"] += 1
        room = 1 << 30 if opened["n"] < 3 else 5_000  # the third shard runs out of space at its write
        return real_open(fileobj=FullDisk(open(name, "wb"), room), mode=mode, **kwargs)

    monkeypatch.setattr(prep.tarfile, "open", filling)
    assert prep.main([str(src), str(dst), "--max_side", "48", "--shard_size", "10000", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and str(dst) in err
    manifest = json.loads((dst / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    for record in manifest["shards"]:  # the complete shards are intact
        assert prep._sha256(dst / record["name"]) == record["sha256"]
    assert not [p for p in dst.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(prep.tarfile, "open", real_open)
    assert prep.main([str(src), str(dst), "--max_side", "48", "--shard_size", "10000", "--workers", "1"]) == 0
    assert shard_bytes(dst) == shard_bytes(fresh)
