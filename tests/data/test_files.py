"""Finding images and leaving out the broken ones."""

import logging

import pytest

from mae_fast.data.files import find_images, scan_images, usable_images
from mae_fast.errors import DataError
from image_files import write_mixed_folder, write_solid_images


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("verify", ["header", "decode"])
def test_broken_files_and_formats_the_backend_cannot_read_are_left_out_and_listed_once(tmp_path, caplog, verify,
                                                                                      backend):
    kinds = write_mixed_folder(tmp_path / "mixed")
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        good = usable_images(tmp_path / "mixed", verify=verify, backend=backend)
    readable = sorted(k for k, v in kinds.items() if v == "good" or v == backend)
    assert sorted(p.rsplit("/", 1)[-1] for p in good) == readable
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"left out {len(kinds) - len(readable)} of {len(kinds)} files" in message
    for name in ("empty.jpg: empty file", "notes.jpg: not an image", "truncated.jpg: truncated JPEG"):
        assert name in message
    gif = "anim.gif: GIF is not decoded by the dali data backend (--data_backend torch reads it"
    assert (gif in message) == (backend == "dali")


def test_decode_check_catches_what_headers_cannot(tmp_path):
    write_solid_images(tmp_path, 1)
    data = (tmp_path / "img_000.jpg").read_bytes()
    # A JPEG whose middle is garbage but whose header and end marker are intact.
    (tmp_path / "garbled.jpg").write_bytes(data[:20] + b"\x00" * (len(data) - 22) + data[-2:])
    good, bad = scan_images(sorted(str(p) for p in tmp_path.iterdir()), verify="decode")
    assert [b[0].rsplit("/", 1)[-1] for b in bad] == ["garbled.jpg"] and "cannot be decoded" in bad[0][1]
    with pytest.raises(ValueError, match="verify must be 'header' or 'decode'"):
        scan_images([], verify="full")


def test_imagenet_layout_and_flat_folders(tmp_path):
    write_solid_images(tmp_path / "imagenet" / "train" / "n01", 2)
    write_solid_images(tmp_path / "imagenet" / "train" / "n02", 3)
    write_solid_images(tmp_path / "imagenet" / "val" / "n01", 1)
    assert len(find_images(tmp_path / "imagenet")) == 5
    assert len(find_images(tmp_path / "imagenet", split="val")) == 1
    assert len(find_images(tmp_path / "imagenet" / "train" / "n02")) == 3


def test_missing_empty_and_all_bad_folders_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        find_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="none of its 1 image files can be read .*a.jpg: empty file"):
        usable_images(tmp_path / "bad")
