"""A shard member that passes the header check but does not decode: left out, marked and named on both backends,
the run going on (DALI finds it by decoding the failed batch on the CPU); --verify_images decode checks each member."""

import io
import logging
import tarfile

import pytest
import torch

from mae_fast.config import DataConfig
from mae_fast.data import build_loader, dali_unavailable_reason
from mae_fast.data.files import encoded_problem
from image_files import color_number, jpeg_bytes, number_color

BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("dali", id="dali", marks=pytest.mark.skipif(dali_unavailable_reason() is not None,
                                                                    reason=str(dali_unavailable_reason())))]


def corrupt_jpeg(color) -> bytes:
    """A JPEG whose start and end markers are intact (so the header check passes) and whose tables are zeroed."""
    data = bytearray(jpeg_bytes(color))
    data[20:200] = bytes(180)
    return bytes(data)


def write_shard(path, count: int, bad: set[int]):
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            data = corrupt_jpeg(number_color(i)) if i in bad else jpeg_bytes(number_color(i))
            info = tarfile.TarInfo(f"s{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def loader(folder, backend, train, verify="header", batch=4):
    cfg = DataConfig(data_path=str(folder), val_path=None if train else str(folder), backend=backend, input_size=16,
                     batch_size=batch, num_workers=0, verify_images=verify)
    return build_loader(cfg, 0, 1, "cpu", 0, train=train, dtype=torch.uint8)


def seen(batches) -> list[int]:
    found = []
    for images, indices in batches:
        for image, index in zip(images, indices.tolist()):
            if index >= 0:
                assert color_number(image.float().mean(dim=(1, 2)).tolist()) == index  # the right pixels
                found.append(index)
    return found


def test_the_corrupt_member_passes_the_header_check():
    assert encoded_problem(corrupt_jpeg((8, 8, 128)), "dali") is None


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_member_that_does_not_decode_is_left_out_and_named_and_the_epochs_go_on(tmp_path, backend, train, caplog):
    write_shard(tmp_path / "shard-000000.tar", 7, bad={0})
    write_shard(tmp_path / "shard-000001.tar", 6, bad=set())  # images 7-12 of the set, numbered from 0 again
    ld = loader(tmp_path, backend, train)
    for epoch in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mae_fast"):
            batches = list(ld.epoch(epoch))
        assert len(batches) == len(ld)
        found = []
        for images, indices in batches:
            for image, index in zip(images, indices.tolist()):
                if index >= 0:
                    found.append(index)
                    number = color_number(image.float().mean(dim=(1, 2)).tolist())
                    assert number == (index if index < 7 else index - 7)  # the right pixels
        assert sorted(found) == list(range(1, 13))  # every image once but the corrupt one
        named = [r.getMessage() for r in caplog.records if "s000000.jpg" in r.getMessage()]
        assert len(named) == 1, caplog.text  # named in one warning per epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_resuming_at_the_batch_of_a_corrupt_member_goes_on(tmp_path, backend):
    write_shard(tmp_path / "shard-000000.tar", 12, bad={5, 6})
    ld = loader(tmp_path, backend, train=False)
    full = [indices for _, indices in ld.epoch(0)]
    where = next(k for k, indices in enumerate(full) if -1 in indices.tolist())
    rest = [indices for _, indices in ld.epoch(0, start=where)]
    assert [t.tolist() for t in rest] == [t.tolist() for t in full[where:]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_images_decode_checks_each_shard_member_as_it_is_read(tmp_path, backend, monkeypatch):
    import mae_fast.data.files as files

    write_shard(tmp_path / "shard-000000.tar", 6, bad={2})
    decoded = []
    real = files.decoded_problem

    def counting(data, backend="torch"):
        decoded.append(1)
        return real(data, backend)

    monkeypatch.setattr(files, "decoded_problem", counting)
    ld = loader(tmp_path, backend, train=False, verify="decode")
    assert sorted(seen(ld.epoch(0))) == [0, 1, 3, 4, 5]
    if backend == "dali":  # checked on the CPU before DALI sees it; the torch backend decodes every member anyway
        assert len(decoded) >= 6
