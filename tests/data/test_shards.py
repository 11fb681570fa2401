"""WebDataset shard sets: naming them, counting them, and reading them on both loader backends."""

import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

from mae_fast.config import DataConfig
from mae_fast.data import build_loader, dali_unavailable_reason
from mae_fast.data import shards
from mae_fast.data.sampler import shard_epoch_plan
from mae_fast.data.shards import expand_braces, is_shard_spec, load_shard_set, read_index, shard_paths, stream_images
from mae_fast.errors import DataError
from image_files import color_number, jpeg_bytes, write_shards

BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("dali", id="dali", marks=pytest.mark.skipif(dali_unavailable_reason() is not None,
                                                                    reason=str(dali_unavailable_reason())))]


def loader(spec, backend, rank=0, world=1, batch=4, size=16, seed=0, train=True, num_workers=0):
    cfg = DataConfig(data_path=str(spec), val_path=None if train else str(spec), backend=backend, input_size=size,
                     batch_size=batch, num_workers=num_workers)
    return build_loader(cfg, rank, world, "cpu", seed, train=train, dtype=torch.uint8)


def numbers(images) -> list[int]:
    return [color_number(c) for c in images.float().mean(dim=(2, 3)).tolist()]


# ----------------------------------------------------------------------------------------------- naming


def test_brace_patterns_expand_in_order():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("a-{1..3}.tar") == ["a-1.tar", "a-2.tar", "a-3.tar"]
    assert expand_braces("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="runs backwards"):
        expand_braces("a-{5..2}.tar")
    with pytest.raises(DataError, match="between two numbers"):
        expand_braces("a-{x..y}.tar")
    with pytest.raises(DataError, match="names 100,000,000 shards, more than the 1,000,000"):  # counted, not expanded
        expand_braces("a-{0000..9999}-{0000..9999}.tar")


def test_shard_sets_by_folder_pattern_list_and_url(tmp_path):
    paths = [str(p) for p in write_shards(tmp_path / "set", [3, 2, 4])]
    assert shard_paths(str(tmp_path / "set")) == paths
    assert shard_paths(str(tmp_path / "set" / "shard-{000000..000002}.tar")) == paths
    listing = tmp_path / "set" / "train.txt"
    listing.write_text("# my shards\nshard-000000.tar\n\n" + paths[1] + "\npipe:cat " + paths[2] + "\n")
    assert shard_paths(str(listing)) == [paths[0], paths[1], "pipe:cat " + paths[2]]
    assert shard_paths("pipe:cat /x/s-{0..1}.tar") == ["pipe:cat /x/s-0.tar", "pipe:cat /x/s-1.tar"]
    for spec in (tmp_path / "set", listing, "pipe:cat x", "http://host/a-{0..3}.tar", paths[0]):
        assert is_shard_spec(str(spec))
    assert not is_shard_spec(str(tmp_path / "missing"))


def test_naming_nothing_is_a_clear_error(tmp_path):
    write_shards(tmp_path / "set", [2])
    with pytest.raises(DataError, match="matches no file"):
        shard_paths(str(tmp_path / "set" / "other-{0..3}.tar"))
    with pytest.raises(DataError, match=r"names 1 missing file\(s\) of 2"):
        shard_paths(str(tmp_path / "set" / "shard-{000000..000001}.tar"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.tar").write_bytes(b"")
    with pytest.raises(DataError, match="names no shards"):
        (tmp_path / "empty.txt").write_text("\n# nothing\n")
        shard_paths(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="missing file"):
        (tmp_path / "bad.txt").write_text("nowhere.tar\n")
        shard_paths(str(tmp_path / "bad.txt"))
    (tmp_path / "image.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    assert not is_shard_spec(str(tmp_path / "image.jpg"))  # a file that is no list of shards
    with pytest.raises(DataError, match="neither a .tar shard nor a text list of shards"):
        shard_paths(str(tmp_path / "image.jpg"))
    with pytest.raises(DataError, match="holds no images"):
        tar = tmp_path / "noimg" / "a.tar"
        tar.parent.mkdir()
        with tarfile.open(tar, "w") as t:
            info = tarfile.TarInfo("x.txt")
            t.addfile(info)
        load_shard_set(str(tar.parent))


# ----------------------------------------------------------------------------------------------- reading


def test_a_sample_is_its_first_image_member(tmp_path):
    (path,) = write_shards(tmp_path, [4])
    images = list(stream_images(str(path)))
    assert [im.key for im in images] == ["s000000", "s000001", "s000002", "s000003"]  # .png of s1, .cls, .json: out
    assert all(im.name.endswith(".jpg") for im in images)
    assert [im.key for im in stream_images(str(path), skip=2)] == ["s000002", "s000003"]
    piped = list(stream_images(f"pipe:cat {path}", skip=1))
    assert [im.data for im in piped] == [im.data for im in images[1:]]


def test_counts_come_from_the_manifest_the_index_or_one_read(tmp_path, caplog, monkeypatch):
    # Each source is made to give a count only it could give (a manifest says 30, an index lists 2 of 5 samples) and
    # the shards read are recorded: reading every shard, or skipping the manifest or the index, gives other counts.
    paths = write_shards(tmp_path, [3, 5, 4])
    read = []
    scan_shard = shards.scan_shard
    monkeypatch.setattr(shards, "scan_shard",
                        lambda path, *rest: read.append(os.path.basename(path)) or scan_shard(path, *rest))

    assert read_index(str(paths[0])) is None
    assert load_shard_set(str(tmp_path)).counts == [3, 5, 4]  # neither manifest nor index: each shard read once
    assert sorted(read) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert read_index(str(paths[0])) == 3  # the read wrote DALI's index file beside the shard
    assert (tmp_path / "shard-000000.idx").read_text().startswith("v1.2 3\n")

    manifest = {"shards": [{"name": "shard-000000.tar", "count": 30, "bytes": paths[0].stat().st_size}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # shard 0 keeps its index (3): the manifest wins
    index = (tmp_path / "shard-000001.idx").read_text().splitlines(keepends=True)
    (tmp_path / "shard-000001.idx").write_text("v1.2 2\n" + "".join(index[1:3]))
    (tmp_path / "shard-000002.idx").unlink()
    read.clear()
    assert load_shard_set(str(tmp_path)).counts == [30, 2, 4]
    assert read == ["shard-000002.tar"]

    manifest["shards"][0]["bytes"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    read.clear()
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        assert load_shard_set(str(tmp_path)).counts == [3, 2, 4]  # the size disagrees: counted again, and said so
    assert "differ from manifest.json" in caplog.text and read == ["shard-000000.tar"]


def test_urls_and_commands_that_fail_name_the_shard(tmp_path, monkeypatch):
    import mae_fast.data.shards as shards

    monkeypatch.setattr(shards, "RETRY_DELAYS", (0.0,))  # tried twice, at once
    with pytest.raises(DataError, match="cannot open shard 'http://127.0.0.1:9/a.tar'"):
        list(stream_images("http://127.0.0.1:9/a.tar"))
    with pytest.raises(DataError, match="the command exited with status 1"):
        list(stream_images(f"pipe:cat {tmp_path / 'missing.tar'}"))


def test_the_plan_deals_every_image_once_with_equal_steps():
    counts = [5, 3, 7, 4, 1]
    for world in (1, 2, 3, 4):
        seen, steps = [], set()
        for rank in range(world):
            plan = shard_epoch_plan(counts, 4, rank, world, epoch=3, seed=1)
            steps.add(len(plan.positions))
            seen += plan.positions[plan.valid].tolist()
        assert sorted(seen) == list(range(sum(counts))) and len(steps) == 1
    a, b = (shard_epoch_plan(counts, 4, 0, 1, epoch=e, seed=1).shard_order for e in (0, 1))
    assert not np.array_equal(a, b)  # a new shard order each epoch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_cover_the_set_exactly_once_and_pixels_match(tmp_path, backend, world):
    write_shards(tmp_path, [7, 4, 9, 3])
    seen, steps = [], set()
    for rank in range(world):
        ld = loader(tmp_path, backend, rank=rank, world=world, batch=3)
        steps.add(len(ld))
        for images, indices in ld.epoch(1):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
            for got, index in zip(numbers(images), indices.tolist()):
                if index >= 0:
                    assert got == index  # the pixels are the image the index names
                    seen.append(index)
    assert len(steps) == 1
    assert sorted(seen) == list(range(23))


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_ranks_than_images_still_run_in_step(tmp_path, backend):
    write_shards(tmp_path, [1, 1])
    seen = []
    for rank in range(3):  # rank 0 gets no image of its own: one batch of padding
        batches = list(loader(tmp_path, backend, rank=rank, world=3, batch=2).epoch(0))
        assert len(batches) == 1
        seen += [i for i in batches[0][1].tolist() if i >= 0]
    assert sorted(seen) == [0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resuming_mid_epoch_continues_with_the_unseen_images(tmp_path, backend):
    write_shards(tmp_path, [6, 5, 7])
    ld = loader(tmp_path, backend, batch=4, world=1)
    full = [indices for _, indices in ld.epoch(2)]
    for start in (1, 3):
        rest = [(images, indices) for images, indices in ld.epoch(2, start=start)]
        assert len(rest) == len(full) - start
        assert all(torch.equal(a, b) for a, (_, b) in zip(full[start:], rest))
        for images, indices in rest:  # the right pixels too, read from the middle of a shard
            assert [n for n, i in zip(numbers(images), indices.tolist()) if i >= 0] == [i for i in indices.tolist()
                                                                                       if i >= 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loader_built_anew_resumes_mid_epoch_with_the_same_augmented_pixels(tmp_path, backend):
    from image_files import write_coordinate_image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, (width, height) in enumerate([(200, 160), (120, 180), (90, 90), (160, 100), (150, 150), (110, 70)]):
        write_coordinate_image(folder / f"coords{i}.png", width, height)
    from mae_fast.prepare import prepare

    prepare(str(folder), str(tmp_path / "shards"), max_side=200, shard_size=40_000, workers=1)
    full = [images for images, _ in loader(tmp_path / "shards", backend, batch=2, size=32).epoch(1)]
    rest = [images for images, _ in loader(tmp_path / "shards", backend, batch=2, size=32).epoch(1, start=1)]
    assert len(rest) == len(full) - 1
    assert all(torch.equal(a, b) for a, b in zip(full[1:], rest))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_member_is_skipped_and_named(tmp_path, backend, caplog):
    import io
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate([jpeg_bytes((8, 8, 128)), b"not an image at all", jpeg_bytes((24, 8, 128)),
                                  jpeg_bytes((40, 8, 128))[:-200]]):
            info = tarfile.TarInfo(f"s{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        (images, indices), = loader(tmp_path, backend, batch=4, train=False).epoch(0)
    assert indices.tolist()[0] == 0 and indices.tolist()[2] == 2
    assert indices.tolist()[1] == -1  # the slot is marked; the batch keeps its shape
    assert "s000001.jpg" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", ["stale", "fresh"])
def test_a_shard_cut_short_skips_its_missing_images_and_says_so(tmp_path, backend, index, caplog):
    import os
    paths = write_shards(tmp_path, [5, 5], extras=False)
    load_shard_set(str(tmp_path))  # counted (and indexed) while whole
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # a copy cut short after counting
    idx = tmp_path / "shard-000001.idx"
    if index == "fresh":  # an index newer than the cut shard: read by its offsets, which run past the end
        os.utime(idx, (os.path.getmtime(paths[1]) + 10,) * 2)
    else:
        os.utime(idx, (os.path.getmtime(paths[1]) - 10,) * 2)
    seen = []
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        for images, indices in loader(tmp_path, backend, batch=4, train=False).epoch(0):
            seen += [i for i in indices.tolist() if i >= 0]
    assert set(range(5)) <= set(seen) and len(seen) < 10
    assert "shard-000001.tar" in caplog.text


def test_torch_backend_streams_pipe_shards(tmp_path):
    paths = write_shards(tmp_path / "set", [3, 4])
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"pipe:cat {p}\n" for p in paths))
    seen = []
    ld = loader(listing, "torch", batch=2, num_workers=2)  # decoding in worker processes
    for images, indices in ld.epoch(0):
        for got, index in zip(numbers(images), indices.tolist()):
            if index >= 0:
                assert got == index
                seen.append(index)
    assert sorted(seen) == list(range(7))


def test_dali_pipeline_is_built_once_per_run(tmp_path):
    if dali_unavailable_reason():
        pytest.skip(dali_unavailable_reason())
    write_shards(tmp_path, [5, 6])
    ld = loader(tmp_path, "dali", batch=4)
    for epoch in range(3):
        assert len(list(ld.epoch(epoch))) == len(ld)
    list(ld.epoch(3, start=1))
    assert ld.builds == 1


def test_a_stale_index_is_caught_by_the_tar_headers_and_the_shard_read_in_order(tmp_path, caplog):
    import os

    (path,) = write_shards(tmp_path / "set", [4], extras=True)
    load_shard_set(str(tmp_path / "set"))  # writes shard-000000.idx for this content
    (other,) = write_shards(tmp_path / "other", [6], extras=False)  # other members at other offsets
    os.replace(other, path)  # the shard replaced; its old index stays, newer than the shard
    idx = tmp_path / "set" / "shard-000000.idx"
    os.utime(idx, (os.path.getmtime(path) + 10,) * 2)
    expected = [im.data for im in stream_images(f"pipe:cat {path}")]  # read as a stream: no index
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        assert [im.data for im in stream_images(str(path))] == expected
        assert [im.data for im in stream_images(str(path), skip=2)] == expected[2:]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "index" in warnings[0]
    assert [im.key for im in stream_images(str(path))] == [f"s{i:06d}" for i in range(6)]


def test_an_index_matching_its_shard_is_read_by_offsets(tmp_path, monkeypatch):
    import io

    from PIL import Image

    import mae_fast.data.shards as shards

    (path,) = write_shards(tmp_path, [5], extras=True)
    load_shard_set(str(tmp_path))
    monkeypatch.setattr(shards, "_tar_images", lambda *a, **k: pytest.fail("read as a tar stream"))
    pixels = [Image.open(io.BytesIO(im.data)).getpixel((5, 5)) for im in stream_images(str(path), skip=1)]
    assert [color_number(rgb) for rgb in pixels] == [1, 2, 3, 4]
