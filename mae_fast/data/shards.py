"""WebDataset shard sets: finding the shards, counting their images, and streaming them in order.

A shard set is named by ``--data_path`` as a folder of ``.tar`` files, a brace pattern
(``'train-{000000..000127}.tar'``, quoted for the shell), a text file listing shard paths or URLs (one per
line; relative paths are relative to the list), or one shard. A shard is a local file, an ``http(s)://`` URL
or a ``pipe:COMMAND`` whose standard output is the tar (``pipe:aws s3 cp s3://bucket/train-000000.tar -``), so
shards can stream from object storage. A command or URL that sends nothing for ``timeout`` seconds
(``--shard_timeout``), at its start or in the middle, is stopped; a command that exits with a non-zero status,
even after a complete tar, has failed. A failed read of a remote shard is tried again after
:data:`RETRY_DELAYS` (continuing after the images already read), then raises :class:`ShardReadError`.

A sample is the group of members that share a name up to the first dot of the file name
(WebDataset's rule); its image is its ``jpg``, ``jpeg``, ``png`` or ``webp`` member, its class (for
fine-tuning) its ``cls`` member (the class index as text), and every other member is ignored.
Samples without an image are not counted. The class names, where the set records them, are the
manifest's ``classes``.

Shards are only ever read front to back (:func:`stream_images`), so a local disk, a network file
system and an object store are read the same way. Planning an epoch needs each shard's image
count, taken from the ``manifest.json`` that ``python -m mae_fast.prepare`` writes beside the
shards, else from DALI index files beside local shards (``<shard>.idx``), else by reading the
shards once (and, for local shards in a writable folder, writing the index files so the next run
starts at once).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mae_fast.errors import DataError

logger = logging.getLogger("mae_fast")

#: The members that hold a sample's image (compared case-insensitively).
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: The member that holds a sample's class index, as text (WebDataset's convention).
LABEL_MEMBER_EXTENSION = "cls"
MANIFEST_NAME = "manifest.json"
#: Seconds a command or URL may send nothing, at its start or in the middle of a shard (``--shard_timeout``).
DEFAULT_SHARD_TIMEOUT = 600.0
#: Waits before each new try of a remote shard whose read failed (then :class:`ShardReadError`).
RETRY_DELAYS = (5.0, 20.0, 60.0)
INDEX_VERSION = "v1.2"  # DALI's webdataset index format (its wds2idx writes the same)


def is_remote(path: str) -> bool:
    """True for shards streamed from a URL or a command rather than read from a local file."""
    return path.startswith(("pipe:", "http://", "https://"))


def is_shard_spec(path: str) -> bool:
    """Whether ``--data_path`` names a shard set rather than a folder of images.

    True for a URL or ``pipe:`` command, a brace pattern, a ``.tar`` file, a text file (the
    list), or a folder holding ``.tar`` files and no image class folders.
    """
    path = str(path)
    if is_remote(path) or _has_braces(path):
        return True
    p = Path(path).expanduser()
    if p.is_file():
        return p.suffix == ".tar" or is_text_file(p)
    if p.is_dir():
        return any(child.suffix == ".tar" for child in p.iterdir() if child.is_file())
    return False


def is_text_file(path: str | os.PathLike, probe: int = 1 << 16) -> bool:
    """Whether ``path`` reads as UTF-8 text with no NUL byte in its first ``probe`` bytes (a shard list can; an image,
    a tar or any other binary file cannot)."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            head = f.read(probe)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return len(head) == probe and exc.start >= probe - 3  # a character cut at the end of the probe
    return True


def _has_braces(path: str) -> bool:
    return bool(re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", path))


#: The most names a brace pattern may expand to (ImageNet-21k in 256 MB shards is about 5,000).
MAX_PATTERN_NAMES = 1_000_000


def brace_count(pattern: str) -> int:
    """How many names ``pattern`` expands to, counted without expanding it (the product of each group's choices; for
    a range nested inside another group's ends, an estimate).

    Raises:
        DataError: a range whose ends are not numbers.
    """
    count = 1
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        if ".." in body:
            lo, hi = body.split("..", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise DataError(f"shard pattern {pattern!r}: the range {{{body}}} must run between two numbers")
            count *= max(0, int(hi) - int(lo) + 1)
        elif "," in body:
            count *= body.count(",") + 1
    return count


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b}`` (zero-padded numbers keep their width) and ``{x,y,z}`` in ``pattern``, in order.

    Raises:
        DataError: a range whose ends are not numbers, or that runs backwards; a pattern of more than
            :data:`MAX_PATTERN_NAMES` names (counted before expanding).
    """
    count = brace_count(pattern)
    if count > MAX_PATTERN_NAMES:
        raise DataError(f"the shard pattern {pattern!r} names {count:,} shards, more than the {MAX_PATTERN_NAMES:,} "
                        "a shard set may have; check the range")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match or not ((".." in match.group(1)) or ("," in match.group(1))):
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"shard pattern {pattern!r}: the range {{{body}}} must run between two numbers")
        if int(hi) < int(lo):
            raise DataError(f"shard pattern {pattern!r}: the range {{{body}}} runs backwards")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in _expand(head + choice + tail)]


def shard_paths(spec: str) -> list[str]:
    """The shards ``spec`` names, in order (see the module docstring).

    Raises:
        DataError: nothing to read: a pattern whose files do not exist, an empty list, a folder
            without ``.tar`` files, a path that does not exist.
    """
    spec = str(spec)
    if is_remote(spec):
        return expand_braces(spec)
    if _has_braces(spec):
        paths = [str(Path(p).expanduser()) for p in expand_braces(spec)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if len(missing) == len(paths):
            raise DataError(f"the shard pattern {spec!r} matches no file ({len(paths)} names, e.g. {paths[0]!r})")
        if missing:
            raise DataError(f"the shard pattern {spec!r} names {len(missing)} missing file(s) of {len(paths)}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return paths
    p = Path(spec).expanduser()
    if p.is_dir():
        paths = sorted(str(child) for child in p.iterdir() if child.suffix == ".tar" and child.is_file())
        if not paths:
            raise DataError(f"the shard folder {str(p)!r} holds no .tar files")
        return paths
    if p.is_file() and p.suffix == ".tar":
        return [str(p)]
    if p.is_file():
        if not is_text_file(p):
            raise DataError(f"data path {str(p)!r} is a file that is neither a .tar shard nor a text list of shards")
        paths = []
        for line in p.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not is_remote(line) and not os.path.isabs(os.path.expanduser(line)):
                line = str(p.parent / line)
            paths.extend(expand_braces(line) if (is_remote(line) or _has_braces(line)) else [line])
        if not paths:
            raise DataError(f"the shard list {str(p)!r} names no shards")
        missing = [s for s in paths if not is_remote(s) and not os.path.isfile(os.path.expanduser(s))]
        if missing:
            raise DataError(f"the shard list {str(p)!r} names {len(missing)} missing file(s): "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return paths
    raise DataError(f"data path {spec!r} does not exist")


# ---------------------------------------------------------------------------------------------- reading


class ShardReadError(DataError):
    """A remote shard (a ``pipe:`` command or a URL) could not be read: it failed to open, exited with a non-zero
    status, or sent nothing for the time limit; raised once its retries are spent."""


def open_shard(path: str, timeout: float = DEFAULT_SHARD_TIMEOUT):
    """A binary stream of the shard's bytes: a local file, an HTTP(S) response, or a command's output.

    Raises:
        ShardReadError: the URL or command cannot be opened.
        DataError: the local file cannot be opened.
    """
    try:
        if path.startswith("pipe:"):
            errors = tempfile.TemporaryFile()  # not a pipe: a command writing much there cannot block on it
            try:
                proc = subprocess.Popen(path[len("pipe:"):], shell=True, stdout=subprocess.PIPE,  # nosec B602
                                        stderr=errors, bufsize=0)
            except BaseException:
                errors.close()
                raise
            return _CommandStream(proc, path, errors, timeout)
        if path.startswith(("http://", "https://")):
            return urllib.request.urlopen(path, timeout=timeout)  # nosec B310
    except OSError as exc:
        raise ShardReadError(f"cannot open shard {path!r}: {exc}") from exc
    try:
        return open(os.path.expanduser(path), "rb", buffering=1 << 20)
    except OSError as exc:
        raise DataError(f"cannot open shard {path!r}: {exc}") from exc


class _CommandStream(io.RawIOBase):
    """A ``pipe:`` command's standard output, read with a time limit for each wait (the first bytes, and any silence
    after); :meth:`finish` reads it to its end and checks the exit status, :meth:`close` stops the command."""

    def __init__(self, proc: subprocess.Popen, path: str, errors, timeout: float):
        self.proc, self.path, self.errors, self.timeout = proc, path, errors, timeout
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            self._stop()
            what = "sent nothing" if not self.received else f"went silent after {self.received} bytes"
            raise ShardReadError(f"shard {self.path!r}: the command {what} for {self.timeout:g} s (--shard_timeout)")
        data = os.read(fd, len(buffer))
        n = len(data)
        buffer[:n] = data
        self.received += n
        if n == 0:
            self._check()
        return n

    def finish(self) -> None:
        """Read what the command still sends after the tar (its padding) and check how it exited.

        Raises:
            ShardReadError: the command exited with a non-zero status, or went silent.
        """
        buffer = bytearray(1 << 16)
        while self.readinto(buffer):
            pass

    def _check(self) -> None:
        try:
            code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._stop()
            raise ShardReadError(f"shard {self.path!r}: the command closed its output but did not exit within "
                                 f"{self.timeout:g} s (--shard_timeout)") from None
        if code != 0:
            self.errors.seek(0)
            err = self.errors.read()[-4096:].decode(errors="replace").strip().splitlines()
            raise ShardReadError(f"shard {self.path!r}: the command exited with status {code}"
                                 f"{': ' + err[-1] if err else ''}")

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self._stop()
        self.proc.stdout.close()
        self.errors.close()
        super().close()


@dataclass
class ShardImage:
    """One image of a shard: its sample key, member name and encoded bytes, and (read when asked for) the text of
    the sample's ``cls`` member (None when it has none)."""

    key: str
    name: str
    data: bytes
    cls: str | None = None


class ShardTruncated(DataError):
    """A shard ended (or became unreadable) before its last member; ``images`` were read before that."""

    def __init__(self, message: str, images: int):
        super().__init__(message)
        self.images = images


def _split(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot <= 0:
        return name, ""
    return name[:len(name) - len(base) + dot], base[dot + 1:].lower()


def stream_images(path: str, skip: int = 0, timeout: float = DEFAULT_SHARD_TIMEOUT, labels: bool = False):
    """Yield each sample's image in ``path`` as a :class:`ShardImage`, front to back, after the first ``skip``.

    With ``labels``, each image carries the text of its sample's ``cls`` member (read from the index's offsets,
    or, in a tar stream, once the sample's members have all been read, whatever their order).

    A remote shard (a command, a URL) whose read fails is opened again after each of
    :data:`RETRY_DELAYS` (with one warning each) and read on after the images already yielded; a
    command or URL sending nothing for ``timeout`` seconds counts as failed.

    A local shard with an index file beside it is read by the index's offsets, with no tar
    parsing: measured here, 10 us an image instead of 33 us, which matters in the training process
    at thousands of images per second. Each member's tar header (the 512 bytes before its data,
    read in the same call; checking it measured 3 us) must name the member and size the index
    gives; at the first that does not (an index left from a shard since replaced), the index is
    dropped for that shard, with one warning, and the shard read as a tar stream from that image
    on. Any other shard is parsed as a tar stream, skipped images read past.

    Raises:
        ShardTruncated: the shard ends or breaks before its last member (a shard cut short).
        ShardReadError: a remote shard kept failing (the message gives the last failure and the tries).
        DataError: a local shard cannot be opened.
    """
    if is_remote(path):
        yield from _remote_images(path, skip, timeout, labels)
        return
    entries = None if _stale_key(path) in _STALE_INDEXES else read_index_entries(path)
    if entries is not None:
        yield from _indexed_images(path, entries, skip, labels)
    else:
        yield from _tar_images(path, skip, labels=labels)


def _remote_images(path: str, skip: int, timeout: float, labels: bool = False):
    done = skip
    for attempt in range(len(RETRY_DELAYS) + 1):
        images = _tar_images(path, done, timeout, labels)
        try:
            for image in images:
                done += 1
                yield image
            return
        except ShardReadError as exc:
            if attempt == len(RETRY_DELAYS):
                raise ShardReadError(f"{exc} ({attempt + 1} attempts)") from exc
            delay = RETRY_DELAYS[attempt]
            logger.warning("%s; retrying in %g s (attempt %d of %d), after the %d image(s) already read", exc, delay,
                           attempt + 2, len(RETRY_DELAYS) + 1, done)
            time.sleep(delay)
        finally:
            images.close()  # stops the command at once when the reader stops early


#: Shards (path, size, mtime) whose index file was found not to fit them; read as tar streams from then on.
_STALE_INDEXES: set[tuple[str, int, int]] = set()


def _stale_key(path: str) -> tuple[str, int, int]:
    try:
        stat = os.stat(os.path.expanduser(path))
    except OSError:
        return path, -1, -1
    return path, stat.st_size, stat.st_mtime_ns


def _header_mismatch(header: bytes, name: str, length: int) -> str | None:
    """Why the tar header block before a member's data does not describe ``name`` of ``length`` bytes, or None.

    Parsed by hand (name, POSIX prefix, size): measured 3 us, against 31 us for ``tarfile.TarInfo.frombuf``.
    """
    field = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\x00":  # POSIX: a long name's start is in the prefix field
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            field = prefix + b"/" + field
    size_field = header[124:136]
    try:
        size = tarfile.nti(size_field)
    except tarfile.InvalidHeaderError:
        size = -1
    wanted = name.encode("utf-8", "surrogateescape")
    # A name too long for the fields is kept in an extended header before this one; the field holds its start.
    named = field == wanted or (len(wanted) > 99 and len(field) >= 90 and wanted.startswith(field[:90]))
    if not named or size != length:
        return f"the tar header there names {field[:100].decode('utf-8', 'replace')!r} of {size} bytes"
    return None


def _indexed_images(path: str, entries: list[IndexEntry], skip: int, labels: bool = False):
    local = os.path.expanduser(path)
    try:
        fd = os.open(local, os.O_RDONLY)
    except OSError as exc:
        raise DataError(f"cannot open shard {path!r}: {exc}") from exc
    try:
        for count, (key, offset, length, name, label) in enumerate(entries[skip:], start=skip):
            block = os.pread(fd, length + 512, offset - 512) if offset >= 512 else b""
            mismatch = "no room for a tar header before it" if offset < 512 else \
                _header_mismatch(block[:512], name, length) if len(block) >= 512 else None  # else: past the end
            if mismatch is not None:
                _STALE_INDEXES.add(_stale_key(path))
                logger.warning("the index file %s does not fit shard %r (at offset %d it names %s, but %s); the index "
                               "is dropped and the shard read in order (remove the index file, and it is written "
                               "again when the set is next counted)", index_path(local), path, offset, name, mismatch)
                break
            data = block[512:]
            if len(data) != length:
                raise ShardTruncated(f"shard {path!r} is cut short or damaged after {count} images "
                                     f"({name} lies past its end)", count)
            cls = None
            if labels and label is not None:
                cls = os.pread(fd, label[1], label[0]).decode("utf-8", "replace")
            yield ShardImage(key, f"{path}#{name}", data, cls)
        else:
            return
    finally:
        os.close(fd)
    yield from _tar_images(path, count, labels=labels)


def _tar_images(path: str, skip: int, timeout: float = DEFAULT_SHARD_TIMEOUT, labels: bool = False):
    stream = open_shard(path, timeout)
    count, held = 0, None
    try:
        try:
            mode = "r:" if not is_remote(path) else "r|"
            with tarfile.open(fileobj=stream, mode=mode) as tar:
                last_key = None
                # With labels, a sample's image is held until its last member has been read: its cls member may
                # come before or after the image.
                group_key, group_cls = None, None
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split(member.name)
                    if labels and key != group_key:
                        if held is not None:
                            held.cls = group_cls
                            yield held
                            held = None
                        group_key, group_cls = key, None
                    if labels and ext.rsplit(".", 1)[-1] == LABEL_MEMBER_EXTENSION:
                        group_cls = _read_member(tar, member).decode("utf-8", "replace")
                        continue
                    if ext.rsplit(".", 1)[-1] not in IMAGE_MEMBER_EXTENSIONS or key == last_key:
                        continue  # not an image, or a second image of the same sample
                    last_key = key
                    if count < skip:
                        count += 1
                        continue
                    image = ShardImage(key, f"{path}#{member.name}", _read_member(tar, member))
                    count += 1
                    if labels:
                        held = image
                    else:
                        yield image
                if held is not None:
                    held.cls = group_cls
                    yield held
                    held = None
            if isinstance(stream, _CommandStream):
                stream.finish()  # a complete tar from a command that then failed is a failure too
        except (tarfile.TarError, EOFError, OSError) as exc:
            count -= held is not None  # an image held for its sample's cls member was not delivered
            raise ShardTruncated(f"shard {path!r} is cut short or damaged after {count} images "
                                 f"({type(exc).__name__}: {exc})", count) from exc
    finally:
        stream.close()


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    data = f.read() if f is not None else b""
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name} is cut short")
    return data


# ---------------------------------------------------------------------------------------------- counting


def index_path(path: str) -> str:
    """The DALI index file of a shard: ``shard-000000.tar`` -> ``shard-000000.idx``."""
    return path + ".idx" if not path.endswith(".tar") else path[:-4] + ".idx"


#: A sample of a DALI index file: ``(key, offset, size, name)`` of its image member, and ``(offset, size)`` of its
#: ``cls`` member (None when it has none).
IndexEntry = tuple[str, int, int, str, "tuple[int, int] | None"]


def read_index_entries(path: str) -> list[IndexEntry] | None:
    """Each sample's image member in a local shard's DALI index file (see :data:`IndexEntry`), or None.

    None when there is no index file, it is not DALI's v1.2 format, or it is older than the shard
    (the shard was replaced since).
    """
    idx = index_path(path)
    try:
        if os.path.getmtime(idx) < os.path.getmtime(os.path.expanduser(path)):
            return None
        with open(idx) as f:
            header = f.readline().split()
            if len(header) != 2 or header[0] != INDEX_VERSION:
                return None
            entries = []
            for line in f:
                fields = line.split()
                image, label = None, None
                for i in range(0, len(fields) - 3, 4):
                    ext, offset, size, name = fields[i].lower(), int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]
                    last = ext.rsplit(".", 1)[-1]
                    if last in IMAGE_MEMBER_EXTENSIONS and image is None:
                        image = (_split(name)[0], offset, size, name)
                    elif last == LABEL_MEMBER_EXTENSION and label is None:
                        label = (offset, size)
                if image is not None:
                    entries.append((*image, label))
            return entries
    except (OSError, ValueError, IndexError):
        return None


def read_index(path: str) -> int | None:
    """Images in a local shard according to its DALI index file, or None without a usable one."""
    entries = read_index_entries(path)
    return None if entries is None else len(entries)


def write_index(path: str, entries: list[list[tuple[str, int, int, str]]],
                temporary: str | os.PathLike | None = None) -> None:
    """Write DALI's index file for a local shard: one line per sample, ``ext offset size name`` per member.

    It is written to ``temporary`` (default: the index's name with ``.tmp-<pid>``) and renamed into place. Nothing is
    written when a member name holds whitespace (the format separates fields by it).
    """
    if any(any(ch.isspace() for ch in name) for sample in entries for *_, name in sample):
        return
    lines = [f"{INDEX_VERSION} {len(entries)}\n"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) + "\n"
              for sample in entries]
    tmp = str(temporary) if temporary is not None else index_path(path) + f".tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, index_path(path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def scan_shard(path: str, timeout: float = DEFAULT_SHARD_TIMEOUT) -> tuple[int, list[list[tuple[str, int, int, str]]]]:
    """Read a shard once: its image count and (local shards) its members for an index file.

    Raises:
        ShardTruncated: the shard is cut short.
        ShardReadError: a remote shard kept failing.
    """
    if is_remote(path):
        return sum(1 for _ in stream_images(path, timeout=timeout)), []
    entries, images, last_key = [], 0, None
    try:
        with tarfile.open(os.path.expanduser(path), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split(member.name)
                if key != last_key:
                    entries.append([])
                    last_key = key
                    images_before = images
                entries[-1].append((ext, member.offset_data, member.size, member.name))
                if ext.rsplit(".", 1)[-1] in IMAGE_MEMBER_EXTENSIONS and images == images_before:
                    images += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardTruncated(f"shard {path!r} is cut short or damaged after {images} images "
                             f"({type(exc).__name__}: {exc})", images) from exc
    return images, entries


def read_manifest(paths: list[str]) -> dict[str, dict]:
    """Per-shard records (``count``, ``bytes``, ``sha256``) from the manifest beside the shards, by shard file name."""
    return _manifest(paths)[0]


def _manifest(paths: list[str]) -> tuple[dict[str, dict], list[str] | None]:
    """The manifest beside the shards: its per-shard records by file name, and its class names (None when it
    records none, as a set of a flat folder, or one prepared before classes were recorded)."""
    if not paths or is_remote(paths[0]):
        folder = None
    else:
        folder = Path(os.path.expanduser(paths[0])).parent
    if folder is None or not (folder / MANIFEST_NAME).is_file():
        return {}, None
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        records = {record["name"]: record for record in manifest.get("shards", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring %s: %s", folder / MANIFEST_NAME, exc)
        return {}, None
    classes = manifest.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        logger.warning("ignoring the classes of %s: not a list of names", folder / MANIFEST_NAME)
        classes = None
    return records, classes


@dataclass
class ShardSet:
    """A shard set's shards and how many images each holds."""

    paths: list[str]
    counts: list[int]
    timeout: float = DEFAULT_SHARD_TIMEOUT
    """Seconds a remote shard may send nothing (``--shard_timeout``)."""
    classes: list[str] | None = None
    """The class names the manifest records (index i is ``cls`` value i), or None."""

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def load_shard_set(spec: str, workers: int = 8, timeout: float = DEFAULT_SHARD_TIMEOUT) -> ShardSet:
    """Find the shards of ``spec`` and count their images (manifest, index files, or one read).

    Local shards whose size differs from the manifest's record are read again and named in a
    warning (a copy cut short, or a shard replaced). ``timeout``: seconds a remote shard may send
    nothing (kept in the set for its reads).

    Raises:
        DataError: no shards, or no images in any of them.
        ShardReadError: a remote shard kept failing while it was counted.
    """
    paths = shard_paths(spec)
    manifest, classes = _manifest(paths)
    counts: list[int | None] = [None] * len(paths)
    changed = []
    for i, path in enumerate(paths):
        record = manifest.get(os.path.basename(path))
        if record is not None and not is_remote(path):
            size = os.path.getsize(os.path.expanduser(path))
            if record.get("bytes") not in (None, size):
                changed.append(f"{path} ({size} bytes, the manifest says {record['bytes']})")
                continue
        if record is not None:
            counts[i] = int(record["count"])
        elif not is_remote(path):
            counts[i] = read_index(path)
    if changed:
        logger.warning("%d shard(s) differ from %s and are counted again: %s", len(changed), MANIFEST_NAME,
                       "; ".join(changed[:5]))
    todo = [i for i, c in enumerate(counts) if c is None]
    if todo:
        start = time.monotonic()
        logger.info("counting the images of %d shard(s) without a manifest entry or index file (one read each; "
                    "index files are written beside local shards where the folder allows, or make them with DALI's "
                    "wds2idx, or prepare the set with python -m mae_fast.prepare)", len(todo))
        damaged = []

        def count(i: int) -> int:
            try:
                images, entries = scan_shard(paths[i], timeout)
            except ShardTruncated as exc:
                damaged.append(str(exc))
                return exc.images
            if entries and os.access(os.path.dirname(os.path.abspath(os.path.expanduser(paths[i]))), os.W_OK):
                try:
                    write_index(paths[i], entries)
                except OSError:
                    pass
            return images

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i, images in zip(todo, pool.map(count, todo)):
                counts[i] = images
        if damaged:
            logger.warning("%d damaged shard(s); their readable images are used: %s", len(damaged),
                           "; ".join(damaged[:5]))
        logger.info("counted in %.1f s", time.monotonic() - start)
    empty = [p for p, c in zip(paths, counts) if c == 0]
    if len(empty) == len(paths):
        raise DataError(f"the shard set {spec!r} holds no images (members named .{', .'.join(IMAGE_MEMBER_EXTENSIONS)})")
    if empty:
        logger.warning("%d shard(s) hold no images and are left out: %s", len(empty), ", ".join(empty[:5]))
    kept = [(p, int(c)) for p, c in zip(paths, counts) if c]
    return ShardSet([p for p, _ in kept], [c for _, c in kept], timeout, classes)


def read_labels(path: str, timeout: float = DEFAULT_SHARD_TIMEOUT) -> list[str | None]:
    """The text of each image sample's ``cls`` member in a shard, in order (None for a sample without one).

    A local shard with an index file has only its ``cls`` members read; any other is read whole.

    Raises:
        ShardTruncated, ShardReadError, DataError: as :func:`stream_images`.
    """
    if not is_remote(path) and _stale_key(path) not in _STALE_INDEXES:
        entries = read_index_entries(path)
        if entries is not None:
            with open(os.path.expanduser(path), "rb") as f:
                fd = f.fileno()
                return [None if label is None else os.pread(fd, label[1], label[0]).decode("utf-8", "replace")
                        for *_, label in entries]
    return [image.cls for image in stream_images(path, timeout=timeout, labels=True)]


# ---------------------------------------------------------------------------------------------- an epoch's images


def plan_images(shard_set: ShardSet, plan, start: int = 0, labels: bool = False):
    """Yield ``(slot, dataset_index, image)`` for the real slots of ``plan`` from slot ``start`` on, in slot order
    (with ``labels``, each image carrying its sample's ``cls`` text; see :func:`stream_images`).

    ``plan`` is a :class:`mae_fast.data.sampler.ShardPlan` over ``shard_set``; its lanes are read
    front to back, each from the shard holding its first position (skipping within it when
    resuming). ``dataset_index`` numbers images by shard in the set's own order (stable across
    epochs). An image a shard cut short no longer holds comes as ``image=None``, and the shard is
    named in one warning.
    """
    import numpy as np

    real = int(plan.valid.sum())
    if start >= real:
        return
    cum = np.concatenate([[0], np.cumsum(plan.counts)])  # in the epoch's shard order
    set_cum = np.concatenate([[0], np.cumsum(shard_set.counts)])  # in the set's order
    done_before = np.bincount(plan.lane_of[:start], minlength=len(plan.lanes))
    lanes = [_lane(shard_set, plan, cum, set_cum, a + int(done_before[k]), b, labels)
             for k, (a, b) in enumerate(plan.lanes)]
    try:
        for slot in range(start, real):
            position, index, image = next(lanes[plan.lane_of[slot]])
            if position != plan.positions[slot]:
                raise AssertionError(f"lane order broken at slot {slot}: {position} != {plan.positions[slot]}")
            yield slot, index, image
    finally:
        for lane in lanes:
            lane.close()


def _lane(shard_set: ShardSet, plan, cum, set_cum, first: int, end: int, labels: bool = False):
    import numpy as np

    position = first
    while position < end:
        s = int(np.searchsorted(cum, position, side="right")) - 1  # the shard (in epoch order) holding it
        shard = int(plan.shard_order[s])
        path, expected = shard_set.paths[shard], int(plan.counts[s])
        member = position - int(cum[s])
        stop = min(end, int(cum[s + 1]))
        images = stream_images(path, skip=member, timeout=shard_set.timeout, labels=labels)
        try:
            for image in images:
                yield position, int(set_cum[shard]) + member, image
                position, member = position + 1, member + 1
                if position >= stop:
                    break
        except ShardTruncated as exc:
            logger.warning("%s; its remaining %d image(s) are skipped this epoch", exc, stop - position)
        else:
            if position < stop:
                logger.warning("shard %r holds fewer images than counted (%d); its remaining %d image(s) are "
                               "skipped this epoch", path, expected, stop - position)
        finally:
            images.close()
        while position < stop:  # images the shard no longer holds
            yield position, int(set_cum[shard]) + member, None
            position, member = position + 1, member + 1
