"""Input checks shared by the fused ops.

Every check raises ``ValueError`` (bad shape, rank or value) or ``TypeError`` (bad dtype) with a
message that names the argument and the offending value, so that a user reading the error knows
which call site to fix without stepping into the op.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, value, ndim: int | tuple[int, ...] | None = None, float_only: bool = False,
                 int_only: bool = False) -> None:
    """Check that ``value`` is a tensor of the expected rank and dtype kind."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if float_only and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    if int_only and value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32 indices, got {value.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Check that all given tensors live on one device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on the same device")


def check_patch_size(patch_size, imgs: torch.Tensor, name: str = "imgs") -> tuple[int, int]:
    """Check that ``patch_size`` divides the image and return the patch grid (h, w)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    H, W = imgs.shape[-2], imgs.shape[-1]
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide the {name} size {H}x{W}")
    return H // patch_size, W // patch_size


def check_indices(name: str, ids: torch.Tensor, upper: int) -> None:
    """Check that every index lies in [0, upper) and that no row repeats an index.

    Distinct indices are part of every op's contract (``sample_mask`` makes them so): the kernel
    backends write each gradient element once instead of accumulating. This reads the tensor
    (one device sync); callers that made the indices themselves (the model) pass
    ``check_indices=False``. Skipped under ``torch.compile`` tracing, where the kernels still
    never read or write out of bounds.
    """
    if ids.numel() == 0 or _is_compiling():
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds index {bad}, outside [0, {upper})")
    if ids.shape[-1] > 1:
        ordered = ids.sort(dim=-1).values
        repeats = (ordered[..., 1:] == ordered[..., :-1]).nonzero()
        if len(repeats):
            row = tuple(repeats[0, :-1].tolist())
            value = int(ordered[row][repeats[0, -1]])
            raise ValueError(f"{name} repeats index {value} in row {row[0] if len(row) == 1 else row}; "
                             "indices must be distinct within a row")


def pos_table(name: str, pos_embed: torch.Tensor | None, length: int, dim: int) -> torch.Tensor | None:
    """Accept a position table of shape [L, D] or [1, L, D] and return it as [L, D]."""
    if pos_embed is None:
        return None
    check_tensor(name, pos_embed, ndim=(2, 3), float_only=True)
    if pos_embed.dim() == 3:
        if pos_embed.shape[0] != 1:
            raise ValueError(f"{name} must have shape [L, D] or [1, L, D], got {tuple(pos_embed.shape)}")
        pos_embed = pos_embed[0]
    if tuple(pos_embed.shape) != (length, dim):
        raise ValueError(f"{name} must have shape [{length}, {dim}] (or [1, {length}, {dim}]), "
                         f"got {tuple(pos_embed.shape)}")
    return pos_embed
