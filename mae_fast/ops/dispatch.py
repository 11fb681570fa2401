"""Backend choice for the fused ops, in one place.

``backend="auto"`` picks ``cuda`` > ``triton`` > ``torch`` by eligibility: the op must have that
backend, the backend must be usable (extension built / Triton importable), and the inputs must suit
it (CUDA tensors in float32/float16/bfloat16). The pure-PyTorch reference (``torch``) runs
everywhere and is the fallback. ``backend="triton"`` also runs on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``), which is how the kernels are tested without a GPU.

An explicit backend that cannot run raises :class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Iterable, Mapping

import torch

from mae_fast.errors import BackendUnavailableError  # raised by explicit backends; re-exported

BACKENDS = ("auto", "cuda", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: The patch ops' Triton kernels (``gather_patches``, ``masked_patch_loss``) hold a whole patch row of
#: p*p*C values, padded to a power of two, in one tile; wider rows would spill registers (and can
#: keep ptxas busy for minutes), so the rule is: rows whose tile is wider than this go to another
#: backend (``auto``: CUDA where it fits, else the torch reference). p = 32 with 3 channels (3,072
#: values, a 4,096 tile) is the widest patch Triton takes.
TRITON_MAX_TILE = 4096


def triton_row_unfit(row_values: int) -> dict[str, str]:
    """``{"triton": reason}`` when a patch row of ``row_values`` values is too wide for the Triton tile, else ``{}``."""
    tile = 1 << max(4, (int(row_values) - 1).bit_length())
    if tile > TRITON_MAX_TILE:
        return {"triton": f"its kernels take patch rows of at most {TRITON_MAX_TILE} values in one tile "
                          f"(p*p*C = {row_values} needs {tile})"}
    return {}

#: op name -> {backend name -> implementation}; each op module registers its own entry.
REGISTRY: dict[str, dict[str, Callable]] = {}


def register(op: str, **implementations: Callable) -> dict[str, Callable]:
    """Record an op's backends (``torch=`` the reference, plus ``triton=`` / ``cuda=``) and return the dict."""
    if "torch" not in implementations:
        raise ValueError(f"{op}: the torch reference implementation is required")
    REGISTRY.setdefault(op, {}).update(implementations)
    return REGISTRY[op]


def check_backend(backend: str, name: str = "backend") -> str:
    """Validate a backend name and return it."""
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


# The probes below are constant for a process: torch.compile evaluates them once while tracing
# instead of tracing into imports.
@torch.compiler.assume_constant_result
def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


@torch.compiler.assume_constant_result
def _triton_import_error() -> str | None:
    err = _import_error("triton") or _import_error("mae_fast.kernels")
    return f"Triton could not be imported ({err})" if err else None


#: The CUDA ops' schemas, defined here in Python at import (mae_fast._C registers only their CUDA kernels),
#: so their fake and autograd implementations exist from the start, built or not.
_CUDA_LIBRARY = torch.library.Library("mae_fast", "FRAGMENT")
# The CUDA kernels' vector-access decision (csrc/common.cuh), registered for every device so tests check it on CPUs.
_CUDA_LIBRARY.define("vectorizable_rows(Tensor t, int vec) -> bool")


def define_cuda_op(schema: str, fake: Callable) -> None:
    """Define ``mae_fast::<schema>`` (a CUDA op whose kernel mae_fast._C registers) with its fake implementation."""
    _CUDA_LIBRARY.define(schema)
    torch.library.register_fake(f"mae_fast::{schema.split('(', 1)[0]}", fake, lib=_CUDA_LIBRARY)


#: The note setup.py leaves in the package when it skipped building mae_fast._C on purpose
#: (``MAE_FAST_SKIP_CUDA_BUILD=1``) or because no GPU was visible.
CUDA_BUILD_SKIPPED_FILE = "cuda_build_skipped.txt"
#: How that note starts when the build was skipped because no GPU was visible (setup.py's NO_GPU_NOTE).
NO_GPU_NOTE = "no GPU was visible when mae_fast was installed"


def cuda_build_skipped(package_dir: str | os.PathLike | None = None) -> str | None:
    """Why the install skipped building mae_fast._C (setup.py's note in the package): on purpose, or
    :data:`NO_GPU_NOTE` and the rest; None when it did not skip (it built, failed, or could not build).

    ``package_dir``: the ``mae_fast`` folder to look in (default: this package's).
    """
    folder = package_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        with open(os.path.join(folder, CUDA_BUILD_SKIPPED_FILE)) as f:
            return f.read().strip() or "skipped"
    except OSError:
        return None


@torch.compiler.assume_constant_result
def _cuda_extension_error() -> str | None:
    err = _import_error("mae_fast._C")
    if err is None:
        return None
    skipped = cuda_build_skipped()
    if skipped:
        how = "with MAE_FAST_FORCE_CUDA_BUILD=1" if skipped.startswith(NO_GPU_NOTE) else \
            "without MAE_FAST_SKIP_CUDA_BUILD=1"
        return (f"the CUDA extension mae_fast._C is not built ({skipped}); build it with "
                f"`pip install --no-build-isolation -e .` {how}, using a CUDA build "
                "of torch and nvcc, with CUDA_HOME naming the toolkit folder (see setup.py)")
    return (f"the CUDA extension mae_fast._C is not built or failed to load ({err}); build it with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) using a CUDA build "
            "of torch and nvcc, with CUDA_HOME naming the toolkit folder (see setup.py)")


def cuda_extension_loaded() -> bool:
    """Load mae_fast._C if it is built (registering its ops' CUDA kernels); True if it is there."""
    return _cuda_extension_error() is None


def _why_not(backend: str, tensors: Iterable[torch.Tensor]) -> str | None:
    """Return why ``backend`` cannot run on ``tensors``, or None if it can."""
    tensors = [t for t in tensors if t is not None]
    if backend == "torch":
        return None
    devices = {t.device.type for t in tensors}
    float_dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    bad = [d for d in float_dtypes if d not in KERNEL_DTYPES]
    if bad:
        return f"it supports float32, float16 and bfloat16 inputs, got {bad[0]}"
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if devices != {"cuda"} and not (devices == {"cpu"} and triton_interpreted()):
            return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {sorted(devices)}"
        return None
    if backend == "cuda":
        if devices != {"cuda"}:
            return f"it needs CUDA tensors, got {sorted(devices)}"
        return _cuda_extension_error()
    raise AssertionError(backend)


def choose(op: str, backend: str, implementations: Mapping[str, Callable], tensors: Iterable[torch.Tensor],
           unfit: Mapping[str, str] | None = None) -> str:
    """Return the name of the backend of ``op`` to run for ``backend`` on ``tensors``.

    Args:
        op: the op's name, for error messages.
        backend: one of :data:`BACKENDS`.
        implementations: backend name -> callable; must contain ``"torch"``.
        tensors: the op's tensor inputs (None entries are ignored).
        unfit: backend -> why these inputs are outside what it handles (a size limit, say);
            ``auto`` passes over such a backend, an explicit request for it raises.

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: an explicit backend the op lacks or that cannot run here.
    """
    check_backend(backend)
    tensors = list(tensors)
    unfit = unfit or {}
    if backend == "auto":
        # The Triton interpreter is a testing aid: "auto" runs kernels only on CUDA tensors.
        on_cuda = all(t.device.type == "cuda" for t in tensors if t is not None)
        for candidate in ("cuda", "triton"):
            if on_cuda and candidate in implementations and candidate not in unfit \
                    and _why_not(candidate, tensors) is None:
                return candidate
        return "torch"
    if backend not in implementations:
        have = ", ".join(repr(b) for b in implementations)
        raise BackendUnavailableError(f"{op}: backend={backend!r} is not implemented for this op (it has {have})")
    reason = unfit.get(backend) or _why_not(backend, tensors)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend={backend!r} cannot run: {reason}")
    return backend

