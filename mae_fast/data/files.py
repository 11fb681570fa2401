"""Finding the images of a dataset folder and leaving out the ones that cannot be decoded.

A folder is either ImageNet-style (``root/train/<class>/*.JPEG``, as the official scripts read
it: pass ``root`` or ``root/train``) or a flat folder of images (searched recursively).

DALI cannot skip a bad file in the middle of an epoch, so files are checked up front: by default
a cheap header check (non-empty, a known image signature, a JPEG that ends with its end-of-image
marker); with ``verify="decode"`` every file is fully decoded once. Bad files are left out with one
warning that lists them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger("mae_fast")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"RIFF", b"II*\x00", b"MM\x00*", b"GIF8")


def find_images(path: str | os.PathLike, split: str = "train") -> list[str]:
    """All image files under ``path`` (or ``path/split`` when that folder exists), sorted.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a folder.
        ValueError: no image files were found.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist or is not a folder")
    if (root / split).is_dir():
        root = root / split
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"data path {str(root)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def header_problem(path: str) -> str | None:
    """Why a file is not a readable image by a cheap check of its first and last bytes, or None."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            if not head.startswith(_SIGNATURES):
                return "not an image (unknown signature)"
            if head.startswith(b"RIFF") and head[8:12] != b"WEBP":
                return "not an image (RIFF but not WEBP)"
            if head.startswith(b"\xff\xd8\xff"):
                f.seek(max(0, size - 2))
                tail = f.read(2)
                if tail != b"\xff\xd9":
                    return "truncated JPEG (no end-of-image marker)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def decode_problem(path: str) -> str | None:
    """Why a file cannot be fully decoded by PIL, or None."""
    problem = header_problem(path)
    if problem:
        return problem
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except Exception as exc:
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def scan_images(files: list[str], verify: str = "header", workers: int = 8) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``files`` into readable ones and ``(path, reason)`` for the rest.

    Args:
        files: image paths.
        verify: "header" (cheap) or "decode" (full decode of every file).
        workers: threads for the check.

    Raises:
        ValueError: ``verify`` is not "header" or "decode".
    """
    if verify not in ("header", "decode"):
        raise ValueError(f"verify must be 'header' or 'decode', got {verify!r}")
    check = header_problem if verify == "header" else decode_problem
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(check, files))
    good = [f for f, p in zip(files, problems) if p is None]
    bad = [(f, p) for f, p in zip(files, problems) if p is not None]
    return good, bad


def usable_images(path: str | os.PathLike, split: str = "train", verify: str = "header", workers: int = 8) -> list[str]:
    """The images under ``path`` that pass the check; warns once, listing the files left out.

    Raises:
        FileNotFoundError / ValueError: as :func:`find_images`, or when every file is bad.
    """
    files = find_images(path, split)
    good, bad = scan_images(files, verify, workers)
    if bad:
        shown = "\n".join(f"  {f}: {why}" for f, why in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        logger.warning("left out %d of %d files under %s that cannot be read as images:\n%s%s",
                       len(bad), len(files), path, shown, more)
    if not good:
        raise ValueError(f"data path {str(path)!r}: none of its {len(files)} image files can be read")
    return good
