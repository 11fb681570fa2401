"""The built-in image set is deterministic real JPEG files."""

from PIL import Image

from mae_fast.data.builtin import builtin_image_dir


def test_builtin_set_is_deterministic_jpegs(tmp_path):
    a = builtin_image_dir(count=6, size=32, cache_dir=tmp_path / "a")
    b = builtin_image_dir(count=6, size=32, cache_dir=tmp_path / "b")
    files_a, files_b = sorted(a.glob("*.jpg")), sorted(b.glob("*.jpg"))
    assert len(files_a) == 6
    assert [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]
    with Image.open(files_a[0]) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    assert len({f.read_bytes() for f in files_a}) == 6  # every scene differs
    assert builtin_image_dir(count=6, size=32, cache_dir=tmp_path / "a") == a  # reused, not rewritten
