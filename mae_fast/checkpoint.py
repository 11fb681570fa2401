"""Training checkpoints: written atomically, read safely, found by ``--resume auto``.

A checkpoint is a dict with the official keys (``model`` in the official key layout,
``optimizer``, ``epoch``, ``scaler``) plus mae_fast's (``step``, ``step_in_epoch``, ``config``,
``rng``, ``format``). It is written to a temporary file in the same folder and renamed into
place, so a crash never leaves a half-written checkpoint under a checkpoint's name. Loading uses
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

FORMAT = "mae_fast-checkpoint-v1"
LAST = "checkpoint-last.pth"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or is not a mae_fast training checkpoint."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "format": FORMAT}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a mae_fast training checkpoint onto the CPU.

    Raises:
        CheckpointError: the file is missing, truncated, not a torch file, or not a mae_fast
            training checkpoint (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: it is truncated or not a torch checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{str(path)!r} is not a mae_fast training checkpoint (found {keys}); to start from "
                              "official MAE weights use MAEViT.load_pretrained")
    missing = [k for k in ("model", "optimizer", "epoch", "step") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    return state


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The most recently completed checkpoint in ``output_dir`` (``checkpoint-last.pth`` or ``checkpoint-<epoch>.pth``)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.iterdir() if re.fullmatch(r"checkpoint-(\d+|last)\.pth", p.name)]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)
