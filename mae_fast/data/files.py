"""Finding the images of a dataset folder and leaving out the ones that cannot be decoded.

A folder is either ImageNet-style (``root/train/<class>/*.JPEG``, as the official scripts read
it: pass ``root`` or ``root/train``) or a flat folder of images (searched recursively).

DALI cannot skip a bad file in the middle of an epoch, so files are checked up front: by default
a cheap header check (non-empty, a known image signature, a JPEG that ends with its end-of-image
marker); with ``verify="decode"`` every file is fully decoded once. The check also knows which
formats each data backend decodes (:data:`BACKEND_FORMATS`: DALI has no GIF decoder), so every
file it accepts can be read by the backend that will read it. Bad files are left out with one
warning that lists them.

Both backends give the same 8-bit RGB image for every format both read: 16-bit images (PNG, TIFF)
are scaled to 8 bits by ``round(v * 255 / 65535)`` as DALI does (:func:`open_rgb`). Pillow reduces
16-bit *color* PNGs to 8 bits itself, by keeping the high byte, so those can differ from DALI's by
one level.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mae_fast.errors import DataError

logger = logging.getLogger("mae_fast")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# File signature -> format name.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"BM": "BMP", b"RIFF": "WEBP",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"GIF8": "GIF"}
#: The formats each data backend decodes (DALI's decoders.image has no GIF decoder; Pillow reads them all).
BACKEND_FORMATS = {"torch": frozenset({"JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF"}),
                   "dali": frozenset({"JPEG", "PNG", "BMP", "WEBP", "TIFF"})}


def open_rgb(path: str):
    """Decode ``path`` to an 8-bit RGB PIL image, whatever its mode (gray, CMYK, palette, 16-bit, ...).

    16-bit and 32-bit integer images are scaled to 8 bits by ``round(v * 255 / 65535)`` (the 16-bit range, as
    DALI scales them) instead of Pillow's clipping, which turns them nearly white.
    """
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            values = np.asarray(img, dtype=np.float64)
            gray = np.clip(np.round(values * (255 / 65535)), 0, 255).astype(np.uint8)
            return Image.fromarray(gray, "L").convert("RGB")
        return img.convert("RGB")


def find_images(path: str | os.PathLike, split: str = "train") -> list[str]:
    """All image files under ``path`` (or ``path/split`` when that folder exists), sorted.

    Raises:
        DataError: ``path`` does not exist, is not a folder, or holds no image files.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} does not exist or is not a folder")
    if (root / split).is_dir():
        root = root / split
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"data path {str(root)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def image_format(head: bytes) -> str | None:
    """The format named by a file's first bytes (JPEG, PNG, BMP, WEBP, TIFF, GIF), or None."""
    return next((name for signature, name in _SIGNATURES.items() if head.startswith(signature)), None)


def image_size(data) -> tuple[int, int] | None:
    """``(width, height)`` of an encoded image (bytes, or a uint8 array) from its header, or None when it cannot be
    told. JPEG and PNG are read directly (a few microseconds); other formats through Pillow's header parser."""
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    n = len(view)
    if n >= 24 and bytes(view[:8]) == b"\x89PNG\r\n\x1a\n":
        return int.from_bytes(view[16:20], "big"), int.from_bytes(view[20:24], "big")
    if n >= 4 and bytes(view[:2]) == b"\xff\xd8":
        position = 2
        while position + 9 < n:
            if view[position] != 0xFF:
                return None
            marker = view[position + 1]
            if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, or a marker without length
                position += 1 if marker == 0xFF else 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
                return (int.from_bytes(view[position + 7:position + 9], "big"),
                        int.from_bytes(view[position + 5:position + 7], "big"))
            position += 2 + int.from_bytes(view[position + 2:position + 4], "big")
        return None
    try:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(bytes(view))) as img:
            return img.size
    except Exception:
        return None


def header_problem(path: str, backend: str = "torch") -> str | None:
    """Why a file is not an image ``backend`` can read, by a cheap check of its first and last bytes, or None."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 2))
            tail = f.read(2)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return signature_problem(head, tail, backend)


def encoded_problem(data: bytes, backend: str = "torch") -> str | None:
    """:func:`header_problem` for an image already in memory (a shard member)."""
    if not data:
        return "empty"
    return signature_problem(bytes(data[:16]), bytes(data[-2:]), backend)


def decoded_problem(data: bytes, backend: str = "torch") -> str | None:
    """:func:`decode_problem` for an image already in memory (a shard member): the header check, then a full decode
    with PIL."""
    import io

    problem = encoded_problem(data, backend)
    if problem:
        return problem
    try:
        open_rgb(io.BytesIO(bytes(data))).load()
    except Exception as exc:
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def signature_problem(head: bytes, tail: bytes, backend: str) -> str | None:
    """Why an image whose first bytes are ``head`` and last two ``tail`` is not one ``backend`` reads, or None."""
    kind = image_format(head)
    if kind is None:
        return "not an image (unknown signature)"
    if kind not in BACKEND_FORMATS[backend]:
        readers = [name for name, formats in BACKEND_FORMATS.items() if kind in formats]
        return f"{kind} is not decoded by the {backend} data backend (--data_backend {' or '.join(readers)} " \
               "reads it; or convert it to JPEG or PNG)"
    if head.startswith(b"RIFF") and head[8:12] != b"WEBP":
        return "not an image (RIFF but not WEBP)"
    if kind == "JPEG" and tail != b"\xff\xd9":
        return "truncated JPEG (no end-of-image marker)"
    return None


def decode_problem(path: str, backend: str = "torch") -> str | None:
    """Why a file is not an image ``backend`` can read, by the header check and a full decode with PIL, or None."""
    problem = header_problem(path, backend)
    if problem:
        return problem
    try:
        open_rgb(path).load()
    except Exception as exc:
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def scan_images(files: list[str], verify: str = "header", workers: int = 8,
                backend: str = "torch") -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``files`` into ones ``backend`` can read and ``(path, reason)`` for the rest.

    Args:
        files: image paths.
        verify: "header" (cheap) or "decode" (full decode of every file).
        workers: threads for the check.
        backend: the data backend that will read them ("torch" or "dali", see :data:`BACKEND_FORMATS`).

    Raises:
        ValueError: ``verify`` is not "header" or "decode", or ``backend`` is unknown.
    """
    if verify not in ("header", "decode"):
        raise ValueError(f"verify must be 'header' or 'decode', got {verify!r}")
    if backend not in BACKEND_FORMATS:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_FORMATS)}, got {backend!r}")
    check = header_problem if verify == "header" else decode_problem
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(lambda path: check(path, backend), files))
    good = [f for f, p in zip(files, problems) if p is None]
    bad = [(f, p) for f, p in zip(files, problems) if p is not None]
    return good, bad


def usable_images(path: str | os.PathLike, split: str = "train", verify: str = "header", workers: int = 8,
                  backend: str = "torch") -> list[str]:
    """The images under ``path`` that ``backend`` can read; warns once, listing the files left out and why.

    Raises:
        DataError: as :func:`find_images`, or when no file can be read.
    """
    files = find_images(path, split)
    good, bad = scan_images(files, verify, workers, backend)
    if bad:
        shown = "\n".join(f"  {f}: {why}" for f, why in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        logger.warning("left out %d of %d files under %s that cannot be read as images:\n%s%s",
                       len(bad), len(files), path, shown, more)
    if not good:
        raise DataError(f"data path {str(path)!r}: none of its {len(files)} image files can be read by the {backend} "
                        f"data backend (the first: {bad[0][0]}: {bad[0][1]})")
    return good
