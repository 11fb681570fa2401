"""Training checkpoints: written atomically, read safely, found by ``--resume auto``.

A checkpoint is a dict with the official keys (``model`` in the official key layout,
``optimizer``, ``epoch``, ``scaler``) plus mae_fast's (``step``, ``step_in_epoch``, ``config``,
``rng``, ``loss_stats``, ``log_line``, ``epoch_sums``: every rank's running loss sums of an epoch
saved in its middle, ``format``). It is written to a temporary file in the same
folder and renamed into place, so a crash never leaves a half-written checkpoint under a
checkpoint's name; temporary files left by a killed save are removed at the next start
(:func:`remove_stale_temporaries`). Loading uses ``torch.load(weights_only=True)``.

The rolling checkpoint is ``checkpoint-last.pth``; the one before it is kept as
``checkpoint-prev.pth`` (the trainer decides when, see :mod:`mae_fast.trainer`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch

from mae_fast.errors import CheckpointError, OutputDirError

FORMAT = "mae_fast-checkpoint-v1"
LAST = "checkpoint-last.pth"
PREV = "checkpoint-prev.pth"
_TEMPORARY = re.compile(r"\.checkpoint-.*\.pth\.tmp-\d+")
_NAMES = re.compile(r"checkpoint-(\d+|last|prev)\.pth")

__all__ = ["CheckpointError", "FORMAT", "LAST", "PREV", "save_checkpoint", "load_checkpoint", "load_file",
           "load_safetensors", "read_summary", "find_latest", "find_checkpoints", "checkpoints_newest_first",
           "remove_stale_temporaries", "check_writable"]


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
    """Remove ``.checkpoint-*.pth.tmp-<pid>`` files a killed save left in ``folder``; returns what was removed.

    Call it before the run writes anything (no save of this run can be under way).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if _TEMPORARY.fullmatch(path.name) and path.is_file():
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
    """``torch.load(weights_only=True)`` onto the CPU, its failures turned into :class:`CheckpointError`."""
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

    Raises:
        CheckpointError: the file is missing, truncated, not a torch file, holds objects other than
            tensors and plain containers, is not a mae_fast training checkpoint, or has a field of the
            wrong type (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    state = load_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        keys = sorted(map(str, state))[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{str(path)!r} is not a mae_fast training checkpoint (found {keys}); to start from "
                              "official MAE weights use MAEViT.load_pretrained")
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
    or None when it cannot be read as a mae_fast checkpoint."""
    try:
        state = load_file(Path(path), mmap=True)
    except CheckpointError:
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
        return None
    return {"step": state["step"], "epoch": state.get("epoch"), "loss_stats": state.get("loss_stats")}


def find_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<epoch>.pth``, ``checkpoint-last.pth`` and ``checkpoint-prev.pth`` in ``output_dir``."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAMES.fullmatch(p.name) and p.is_file())


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``output_dir``, most recently written first (``checkpoint-prev.pth`` is never newer than
    ``checkpoint-last.pth``)."""
    return sorted(find_checkpoints(output_dir), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The most recently written checkpoint in ``output_dir`` (``checkpoint-prev.pth`` counts only where the last
    is missing, e.g. deleted by hand), or None."""
    return next(iter(checkpoints_newest_first(output_dir)), None)
