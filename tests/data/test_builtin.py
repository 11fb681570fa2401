"""The built-in image set: deterministic real JPEG files in classes, with a held-out split."""

from PIL import Image

from mae_fast.data.builtin import CLASSES, builtin_image_dir


def test_builtin_set_is_deterministic_jpegs_in_class_folders(tmp_path):
    a = builtin_image_dir(count=16, size=32, cache_dir=tmp_path / "a")
    b = builtin_image_dir(count=16, size=32, cache_dir=tmp_path / "b")
    files_a, files_b = sorted(a.rglob("*.jpg")), sorted(b.rglob("*.jpg"))
    assert len(files_a) == 16 + 8  # two training and one held-out image per class
    assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]
    with Image.open(files_a[0]) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    assert len({f.read_bytes() for f in files_a}) == len(files_a)  # every scene differs
    for split, per_class in (("train", 2), ("val", 1)):
        assert sorted(p.name for p in (a / split).iterdir()) == sorted(CLASSES)
        assert all(len(list((a / split / kind).iterdir())) == per_class for kind in CLASSES)
    train = {f.read_bytes() for f in (a / "train").rglob("*.jpg")}
    assert not train & {f.read_bytes() for f in (a / "val").rglob("*.jpg")}  # held out
    assert builtin_image_dir(count=16, size=32, cache_dir=tmp_path / "a") == a  # reused, not rewritten
