"""Writers of small image folders for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def index_color(i: int) -> tuple[int, int, int]:
    """A solid color that identifies image ``i`` (channels at least 20 apart between images)."""
    return (20 * i + 10) % 256, (250 - 20 * i) % 256, 60 + (i % 3) * 60


def color_index(rgb) -> int:
    """Inverse of :func:`index_color` for i < 12."""
    return int(round((rgb[0] - 10) / 20))


def write_solid_images(folder: Path, count: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.jpg"
        Image.new("RGB", size, index_color(i)).save(path, quality=95)
        paths.append(path)
    return paths


def write_coordinate_image(path: Path, width: int = 200, height: int = 160) -> None:
    """R encodes the column and G the row (lossless PNG), so a crop can be read back from the output."""
    xx, yy = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    rgb = np.stack([xx, yy, np.full_like(xx, 128)], axis=-1).round().astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)


def write_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG of ``values`` (uint16 [H, W] gray or [H, W, 3] RGB); Pillow cannot write 16-bit color PNGs."""
    import struct
    import zlib

    height, width = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def write_mixed_folder(folder: Path) -> dict[str, str]:
    """Good images in odd formats plus broken files; returns name -> 'good', 'bad', or 'torch' (only the torch
    backend decodes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB")
    kinds = {}
    rgb.save(folder / "plain.jpg", quality=90); kinds["plain.jpg"] = "good"
    rgb.convert("L").save(folder / "gray.jpg"); kinds["gray.jpg"] = "good"
    rgb.convert("CMYK").save(folder / "cmyk.jpg"); kinds["cmyk.jpg"] = "good"
    rgb.save(folder / "image.png"); kinds["image.png"] = "good"
    rgb.save(folder / "progressive.jpg", progressive=True, quality=90); kinds["progressive.jpg"] = "good"
    write_png16(folder / "gray16.png", rng.integers(0, 65536, (48, 64), dtype=np.uint16)); kinds["gray16.png"] = "good"
    write_png16(folder / "rgb16.png", rng.integers(0, 65536, (48, 64, 3), dtype=np.uint16)); kinds["rgb16.png"] = "good"
    rgb.save(folder / "anim.gif"); kinds["anim.gif"] = "torch"
    (folder / "empty.jpg").write_bytes(b""); kinds["empty.jpg"] = "bad"
    (folder / "notes.jpg").write_text("this is not an image"); kinds["notes.jpg"] = "bad"
    data = (folder / "plain.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2]); kinds["truncated.jpg"] = "bad"
    return kinds


def number_color(i: int) -> tuple[int, int, int]:
    """A solid color that identifies image ``i`` < 225 (red and green 16 levels apart)."""
    return 8 + 16 * (i % 15), 8 + 16 * (i // 15), 128


def color_number(rgb) -> int:
    """Inverse of :func:`number_color`."""
    return int(round((rgb[0] - 8) / 16)) + 15 * int(round((rgb[1] - 8) / 16))


def jpeg_bytes(color, size=(40, 30), quality=95) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_shards(folder: Path, counts: list[int], extras: bool = True) -> list[Path]:
    """WebDataset shards ``shard-00000{k}.tar`` holding ``counts[k]`` samples; image ``i`` (counted across the
    shards in order) is a solid :func:`number_color` JPEG. With ``extras`` each sample also has ``.cls`` and
    ``.json`` members, and one sample has a second image (a ``.png``), which readers must ignore."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    paths, i = [], 0
    for k, count in enumerate(counts):
        path = folder / f"shard-{k:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                members = [(f"s{i:06d}.jpg", jpeg_bytes(number_color(i)))]
                if extras:
                    members += [(f"s{i:06d}.cls", str(i % 3).encode()), (f"s{i:06d}.json", b"{}")]
                    if i == 1:
                        members.append((f"s{i:06d}.png", jpeg_bytes((0, 0, 0))))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        paths.append(path)
    return paths
