"""Training checkpoints: written atomically, read safely, found by ``--resume auto``.

A checkpoint is a dict with the official keys (``model`` in the official key layout,
``optimizer``, ``epoch``, ``scaler``) plus mae_fast's (``step``, ``step_in_epoch``, ``config``,
``rng``, ``loss_stats``, ``log_line``, ``epoch_sums``: every rank's running loss sums of an epoch
saved in its middle, ``format``). It is written to a temporary file in the same
folder and renamed into place, so a crash never leaves a half-written checkpoint under a
checkpoint's name; temporary files left by a killed save are removed at the next start
(:func:`remove_stale_temporaries`). Loading uses ``torch.load(weights_only=True)``.

The rolling checkpoint is ``checkpoint-last.pth``; the one before it is kept as
``checkpoint-prev.pth`` (the engine decides when, see :mod:`mae_fast.engine`).

Two formats (``--checkpoint_format``):

- ``full``: one file (``checkpoint-last.pth``), the whole model and optimizer gathered to rank 0,
  the model under the official ``model`` key.
- ``dcp``: a folder (``checkpoint-last.dcp/``) written by :mod:`torch.distributed.checkpoint`:
  each rank writes its own shard of the model and optimizer (``__<rank>_0.distcp``), rank 0 the
  index (``.metadata``) and the rest of the state (``mae_fast.pt``: epoch, step, generator states,
  loss statistics, ...). It loads into any number of ranks (the shards are re-cut on load) and
  can be written in the background (:class:`PendingSave`). The same rules hold: the folder is
  written under a temporary name and renamed into place only once every rank's shard and the
  index are on disk; :func:`dcp_problem` finds a folder with a missing or truncated shard, which
  ``--resume auto`` passes over. Everything that reads a checkpoint (:func:`load_file`) reads both.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from mae_fast.errors import CheckpointError, OutputDirError

# DCP warns on every save and load of one process alone (no process group), which is what mae_fast asks for there.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized, assuming the "
                                          "intent is to (save|load) in a single process")

FORMAT = "mae_fast-checkpoint-v1"
LAST = "checkpoint-last.pth"
PREV = "checkpoint-prev.pth"
CHECKPOINT_FORMATS = ("full", "dcp")
DCP_SUFFIX = ".dcp"
#: In a DCP checkpoint folder: everything but the model's and optimizer's tensors (rank 0 writes it).
STATE_FILE = "mae_fast.pt"
_TEMPORARY = re.compile(r"\.checkpoint-.*\.(pth|dcp)\.(tmp|old)-\d+")
_NAMES = re.compile(r"checkpoint-(\d+|last|prev)\.(pth|dcp)")

__all__ = ["CheckpointError", "FORMAT", "LAST", "PREV", "CHECKPOINT_FORMATS", "checkpoint_name", "is_dcp",
           "save_checkpoint", "save_dcp_checkpoint", "PendingSave", "load_checkpoint", "load_dcp_tensors",
           "dcp_problem", "load_file", "load_safetensors", "read_summary", "find_latest", "find_checkpoints",
           "checkpoints_newest_first", "remove_stale_temporaries", "check_writable"]


def checkpoint_name(name: str, checkpoint_format: str) -> str:
    """``name`` (``checkpoint-last.pth``, ``checkpoint-3.pth``, ...) as ``checkpoint_format`` names it: unchanged for
    ``full``, with the folder suffix ``.dcp`` for ``dcp``."""
    return name if checkpoint_format == "full" else name.removesuffix(".pth") + DCP_SUFFIX


def is_dcp(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (a folder holding a ``.metadata`` index)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def _os_error_line(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write (then remove) a small file in it.

    Raises:
        OutputDirError: the folder cannot be created or written (the message names it and the cause,
            e.g. ``Read-only file system`` or ``No space left on device``).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".mae_fast-write-test-", dir=folder)
        try:
            os.write(handle, b"mae_fast")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"--output_dir {str(folder)!r} cannot be written: {_os_error_line(exc)}") from exc


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.checkpoint-*.pth.tmp-<pid>`` files and ``.checkpoint-*.dcp.tmp-<n>`` folders a killed save left in
    ``folder``; returns what was removed.

    Call it before the run writes anything (no save of this run can be under way).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if _TEMPORARY.fullmatch(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_checkpoint(state: dict, path: str | os.PathLike, keep_previous_as: str | os.PathLike | None = None) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename); returns the path.

    Args:
        state: the checkpoint dict.
        path: where it goes.
        keep_previous_as: if given, a file already at ``path`` is kept under this name once the new one is
            completely written (and only then), instead of being replaced. It is linked (or copied) there
            before the new file is renamed over ``path``, so at every instant ``path`` holds a complete
            checkpoint, whenever the process is killed.

    Raises:
        OutputDirError: the file cannot be written (full disk, read-only folder, ...): the message names the
            folder and the cause; what was at ``path`` before is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with _ctrl_c_after_the_save():  # a Ctrl-C lands after the rename, with the checkpoint complete
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                try:
                    torch.save({**state, "format": FORMAT}, f)
                except RuntimeError as exc:
                    cause = _os_error_behind(exc)
                    if cause is None:
                        raise
                    raise cause from None
                f.flush()
                os.fsync(f.fileno())
            if keep_previous_as is not None and path.exists():
                _keep_copy(path, Path(keep_previous_as))
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputDirError(f"cannot write checkpoint {path.name} in {str(path.parent)!r}: "
                                 f"{_os_error_line(exc)}; the checkpoints already there are intact") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


def _os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError behind a RuntimeError of torch.save's zip writer (a full disk, say), or None: the writer reports a
    failed ``write`` of the file as "unexpected pos ...", with the OSError only as its context."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause


def _keep_copy(path: Path, keep: Path) -> None:
    """Put ``path``'s content at ``keep`` atomically, leaving ``path`` in place: a hard link, or a copy where the
    file system has none."""
    staging = keep.with_name(f".{keep.name}.tmp-{os.getpid()}")
    try:
        try:
            os.link(path, staging)
        except OSError:
            shutil.copyfile(path, staging)
        os.replace(staging, keep)
    finally:
        if staging.exists():
            staging.unlink()


@contextlib.contextmanager
def _ctrl_c_after_the_save():
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: torch.save interrupted half-way
    raises an unrelated error from its zip writer, and the checkpoint would be lost for nothing. A handler other
    than Python's own (``mae_fast.pretrain``'s, which asks the run to stop after the step) is left in place."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------- DCP checkpoints (folders)

def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the system or the file
    system cannot, so the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0


def _fsync_folder(folder: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _publish(tmp: Path, path: Path, keep_previous_as: Path | None) -> None:
    """Put the complete folder ``tmp`` at ``path``; what was at ``path`` goes to ``keep_previous_as``, or away.

    Where the file system can swap two names atomically (Linux), ``path`` and ``keep_previous_as`` hold a complete
    checkpoint at every instant. Elsewhere there is a moment between two renames when ``path`` is missing
    (``--resume auto`` then takes the newest one still there).
    """
    _fsync_folder(tmp)
    old = None
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        old = tmp  # now holds the previous checkpoint
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
    if old is not None and keep_previous_as is not None:
        if not keep_previous_as.exists():
            os.replace(old, keep_previous_as)
            old = None
        elif not _exchange(old, keep_previous_as):  # after an exchange, ``old`` holds the older kept one
            _remove(keep_previous_as)
            os.replace(old, keep_previous_as)
            old = None
    if old is not None:
        _remove(old)
    _fsync_folder(path.parent)


def _save_error(exc: BaseException, path: Path) -> OutputDirError:
    """A failed DCP write as the save failure a full save reports: the folder and the cause (the first rank's)."""
    failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint's CheckpointException: rank -> error
    if failures:
        rank, cause = sorted(failures.items(), key=lambda item: item[0])[0]
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback) as DCP wraps them
        cause = cause if isinstance(cause, OSError) else _os_error_behind(cause) or cause
        where = f" (rank {rank})"
    else:
        cause, where = (exc if isinstance(exc, OSError) else _os_error_behind(exc) or exc), ""
    text = _os_error_line(cause) if isinstance(cause, OSError) else f"{type(cause).__name__}: {cause}"
    return OutputDirError(f"cannot write checkpoint {path.name} in {str(path.parent)!r}{where}: {text}; the "
                          f"checkpoints already there are intact")


def _save_failures() -> tuple[type[BaseException], ...]:
    """What a failed DCP write raises: any Exception, and DCP's CheckpointException (a BaseException, never a
    KeyboardInterrupt)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


class PendingSave:
    """A DCP checkpoint being written (in the background, or already written): :meth:`wait` for it.

    The folder is renamed into place (by the rank that publishes, rank 0) as soon as every rank's shard and the index
    are on disk: :meth:`publish_if_done` does it without waiting, at any step.
    """

    def __init__(self, future, tmp: Path, path: Path, keep_previous_as: Path | None, publishes: bool):
        self.future, self.tmp, self.path = future, tmp, path
        self.keep_previous_as, self.publishes = keep_previous_as, publishes
        self.published = False

    def done(self) -> bool:
        """Whether the write has ended (written or failed)."""
        return self.future is None or self.future.done()

    def publish_if_done(self) -> None:
        """Rename the written folder into place if the write has ended well; never waits, never raises (a failure
        is raised by :meth:`wait`)."""
        if self.publishes and not self.published and self.done() and \
                (self.future is None or self.future.exception() is None):
            with contextlib.suppress(OSError):  # wait() tries again and reports it
                self._publish()

    def _publish(self) -> None:
        _publish(self.tmp, self.path, self.keep_previous_as)
        self.published = True

    def wait(self) -> Path:
        """Wait for the write to end, publish it; returns the checkpoint's path.

        Raises:
            OutputDirError: the write failed on some rank (every rank raises it), or the folder could not be renamed
                into place; the checkpoints already there are intact.
        """
        try:
            if self.future is not None:
                self.future.result()
            if self.publishes and not self.published:
                self._publish()
        except _save_failures() as exc:
            if self.publishes:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise _save_error(exc, self.path) from exc
        return self.path


def save_dcp_checkpoint(tensors: dict, state: dict, path: str | os.PathLike, keep_previous_as=None, *,
                        publishes: bool, background: bool = False, process_group=None) -> PendingSave:
    """Write a DCP checkpoint folder: every rank its shard of ``tensors``, rank 0 (``publishes``) ``state``.

    Every rank calls it (it is a collective). The folder is written as ``.<name>.tmp-<step>`` and renamed into place
    when complete, the previous one going to ``keep_previous_as`` if given.

    Args:
        tensors: ``{"model": ..., "optimizer": ...}`` as ``get_state_dict`` gives them (DTensor shards under FSDP).
        state: the rest of the checkpoint (``step`` names the temporary folder), written by rank 0 as ``mae_fast.pt``.
        path: the checkpoint folder (``checkpoint-last.dcp``).
        keep_previous_as: where the folder already at ``path`` goes once the new one is complete.
        publishes: this rank writes ``state`` and renames the folder (rank 0).
        background: write in a background thread (``dcp.async_save`` on a copy of the tensors staged in CPU memory)
            and return at once; ``wait()`` on the result before the next save and before the process ends.
        process_group: the group the ranks coordinate over (a background save needs one of its own, CPU-capable).

    Returns:
        a :class:`PendingSave` (already written unless ``background``; call ``wait()`` either way to publish).

    Raises:
        OutputDirError: a synchronous write failed (on every rank).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{int(state['step'])}")
    no_dist = not dist.is_initialized()
    try:
        with _ctrl_c_after_the_save():
            if publishes:
                tmp.mkdir(parents=True, exist_ok=True)
                with open(tmp / STATE_FILE, "wb") as f:
                    torch.save({**state, "format": FORMAT}, f)
                    f.flush()
                    os.fsync(f.fileno())
            writer = dcp.FileSystemWriter(tmp, sync_files=True)
            if background:
                future = dcp.async_save(tensors, storage_writer=writer, process_group=process_group, no_dist=no_dist)
                return PendingSave(future, tmp, path, keep_previous_as, publishes)
            dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=no_dist)
    except _save_failures() as exc:
        if publishes:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(exc, path) from exc
    return PendingSave(None, tmp, path, keep_previous_as, publishes)


def _dcp_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def dcp_problem(path: str | os.PathLike) -> str | None:
    """What makes a DCP checkpoint folder unusable (a missing or truncated shard, a missing index or state file), in
    a few words, or None when it is complete. Reads the index, not the tensors."""
    path = Path(path)
    if not path.is_dir():
        return "does not exist"
    if not (path / STATE_FILE).is_file():
        return f"lacks {STATE_FILE} (the run's state, which rank 0 writes)"
    if not (path / ".metadata").is_file():
        return "lacks its index .metadata (the save did not finish)"
    try:
        metadata = _dcp_metadata(path)
    except Exception as exc:
        return f"its index .metadata cannot be read ({_reason(exc)})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"lacks the shard file {name} (one rank's part of the checkpoint)"
        if shard.stat().st_size < size:
            return f"its shard file {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    return None


def _dcp_state(path: Path) -> dict:
    """A DCP folder's ``mae_fast.pt`` after checking the folder is complete; its ``model`` holds the parameters'
    shapes and dtypes as meta tensors (from the index), ``optimizer`` is ``{}`` where the folder has optimizer
    state (absent where not), and ``dcp`` is True.

    Raises:
        CheckpointError: the folder is incomplete (naming what is missing) or its state file cannot be read.
    """
    problem = dcp_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it {problem}")
    state = load_file(path / STATE_FILE)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a mae_fast training checkpoint (its {STATE_FILE} is not one)")
    entries = _dcp_metadata(path).state_dict_metadata
    model = {}
    for key, entry in entries.items():
        if key.startswith("model.") and hasattr(entry, "size"):
            model[key[len("model."):]] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device="meta")
    has_optimizer = any(key.startswith("optimizer.") for key in entries)
    return {**state, "model": model, **({"optimizer": {}} if has_optimizer else {}), "dcp": True}


def load_dcp_tensors(path: str | os.PathLike, template: dict, process_group=None) -> None:
    """Load a DCP folder's tensors into ``template`` in place (``{"model": ..., "optimizer": ...}`` as
    ``get_state_dict`` gives them, sharded as this run shards: DCP re-cuts the shards of any number of ranks).
    Every rank of the group calls it; with no process group (or ``process_group=False``) it loads on this process
    alone.

    Raises:
        CheckpointError: the folder is incomplete, or does not hold what ``template`` asks for.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    problem = dcp_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it {problem}")
    alone = process_group is False or not dist.is_initialized()
    try:
        dcp.load(template, storage_reader=dcp.FileSystemReader(path), process_group=None if alone else process_group,
                 no_dist=alone)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit: {_reason(exc)}") from exc


def _load_dcp_model(path: Path) -> dict:
    """A DCP folder read on this process alone, as a full checkpoint reads: its state with the whole ``model``."""
    state = _dcp_state(path)
    model = {key: torch.empty(value.shape, dtype=value.dtype) for key, value in state["model"].items()}
    load_dcp_tensors(path, {"model": model}, process_group=False)
    return {**{k: v for k, v in state.items() if k not in ("optimizer", "dcp")}, "model": model}


# The fields a resume reads, with the type each must have.
_FIELD_TYPES = {"model": dict, "optimizer": dict, "epoch": int, "step": int, "step_in_epoch": int}


def _reason(exc: BaseException) -> str:
    """The telling part of torch.load's (or safetensors') error, short: its ``Unsupported ...`` line where it has one
    (torch's text around it advises weights_only=False, which is not advice to pass on), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
    telling = telling.split("WeightsUnpickler error:")[-1].strip()
    return f"{type(exc).__name__}: {telling[:160]}" if telling else type(exc).__name__


def load_file(path: str | os.PathLike, mmap: bool = False):
    """``torch.load(weights_only=True)`` onto the CPU, its failures turned into :class:`CheckpointError`.

    A DCP checkpoint folder reads as a full checkpoint file does: its state with the whole ``model`` (the optimizer's
    shards are not read)."""
    if Path(path).is_dir():
        return _load_dcp_model(Path(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a pickle that names classes or functions: refused, never run
            raise CheckpointError(f"checkpoint {str(path)!r} contains objects that are not plain tensors; refusing "
                                  f"to unpickle it ({_reason(exc)}). Only load a file you trust, with "
                                  "torch.load(weights_only=False), and save its tensors again") from exc
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it is not a checkpoint, or it is truncated "
                              f"({_reason(exc)})") from exc
    except Exception as exc:  # whatever torch.load makes of bytes that are not a torch file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it is not a checkpoint, or it is truncated "
                              f"({_reason(exc)})") from exc


def load_safetensors(path: str | os.PathLike) -> dict:
    """The tensors of a ``.safetensors`` file, on the CPU.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors.torch import load_file as load_tensors

    try:
        return load_tensors(os.fspath(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it is not a safetensors file, or it is "
                              f"truncated ({_reason(exc)})") from exc


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a mae_fast training checkpoint onto the CPU.

    A DCP folder gives its state without the tensors: ``model`` holds the parameters' shapes as meta tensors,
    ``dcp`` is True, and the engine loads the shards itself (:func:`load_dcp_tensors`), as this run shards them.

    Raises:
        CheckpointError: the file is missing, truncated, not a torch file, holds objects other than
            tensors and plain containers, is not a mae_fast training checkpoint, or has a field of the
            wrong type (the message says which).
    """
    path = Path(path)
    if path.is_dir():
        state = _dcp_state(path)
    elif not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    else:
        state = load_file(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            keys = sorted(map(str, state))[:6] if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{str(path)!r} is not a mae_fast training checkpoint (found {keys}); to start "
                                  "from official MAE weights use MAEViT.load_pretrained")
    missing = [k for k in ("model", "optimizer", "epoch", "step") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    for key, kind in _FIELD_TYPES.items():
        value = state.get(key, 0 if kind is int else {})
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its {key!r} is {value!r:.60} "
                                  f"({type(value).__name__}), not {'an integer >= 0' if kind is int else 'a dict'}")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its 'model' holds values that are not tensors")
    return state


def read_summary(path: str | os.PathLike) -> dict | None:
    """``step``, ``epoch`` and ``loss_stats`` of a checkpoint, read without loading its tensors (memory-mapped),
    or None when it cannot be read as a mae_fast checkpoint (a DCP folder: when it is incomplete)."""
    path = Path(path)
    if path.is_dir():
        if dcp_problem(path):
            return None
        path = path / STATE_FILE
    try:
        state = load_file(path, mmap=True)
    except CheckpointError:
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        return None
    return {"step": state["step"], "epoch": state.get("epoch"), "loss_stats": state.get("loss_stats")}


def find_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<epoch>``, ``checkpoint-last`` and ``checkpoint-prev`` in ``output_dir``: ``.pth`` files
    and ``.dcp`` folders."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if _NAMES.fullmatch(p.name) and (p.is_dir() if p.suffix == DCP_SUFFIX else p.is_file()))


def _written_at(path: Path) -> int:
    """When a checkpoint was written: a file's time, or a DCP folder's state file's (a rename keeps it)."""
    inside = path / STATE_FILE
    return (inside if path.is_dir() and inside.exists() else path).stat().st_mtime_ns


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``output_dir``, most recently written first (``checkpoint-prev.pth`` is never newer than
    ``checkpoint-last.pth``)."""
    return sorted(find_checkpoints(output_dir), key=_written_at, reverse=True)


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The most recently written checkpoint in ``output_dir`` (``checkpoint-prev.pth`` counts only where the last
    is missing, e.g. deleted by hand), or None."""
    return next(iter(checkpoints_newest_first(output_dir)), None)
