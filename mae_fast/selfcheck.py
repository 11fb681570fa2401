"""Numerical self-test: every fused op, attention backend and decoder this machine will run, against its reference.

``python -m mae_fast.info --check`` runs :func:`run_checks` and prints one row per check; the
trainer runs :func:`verify_kernel_backends` on a small probe before it trusts a kernel backend.

The tolerance rule is the one the test suite uses (STYLE.md): for an output (or gradient) ``out``
of a backend run in the test dtype, ``ref_hi`` the reference in float64 on the same input values
and ``ref_lo`` the reference run in the test dtype, the check passes when
``max|out - ref_hi| <= 2 * max|ref_lo - ref_hi| + floor``: a kernel may differ from the exact
result by at most twice what the reference itself loses in that dtype.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Callable, Iterable, Sequence

import torch

from mae_fast.ops import IMPLEMENTATIONS, dispatch
from mae_fast.ops.gather_patches import gather_patches
from mae_fast.ops.gather_tokens import add_pos_embed, gather_tokens
from mae_fast.ops.masked_patch_loss import masked_patch_loss
from mae_fast.ops.normalize import IMAGENET_MEAN_255, IMAGENET_STD_255
from mae_fast.ops.restore_tokens import restore_tokens
from mae_fast.ops.sample_mask import sample_mask
from mae_fast.ops.shapes import MAE_SHAPES, OpShape

#: Kernel backends in the order ``auto`` prefers them; the reference (``torch``) last.
BACKEND_ORDER = ("cuda", "triton", "torch")
#: The trainer's probe: small and odd (D and p*p*C not powers of two), milliseconds on any backend.
PROBE_SHAPE = OpShape("probe", 2, 3, 24, 40, 8, 0.6, 24, 36)
#: ``--check`` on a GPU: ViT-B/16's shapes at a batch that keeps the float64 references quick.
GPU_CHECK_SHAPE = dataclasses.replace(MAE_SHAPES[0], name="vit_b16_b32", batch=32)
FLOOR = 1e-6


@dataclasses.dataclass
class CheckResult:
    """One row of the self-test: ``ok`` is None for a check that was skipped (``note`` says why)."""

    check: str
    backend: str
    dtype: str
    max_error: float | None
    tolerance: float | None
    ok: bool | None
    seconds: float
    note: str = ""

    @property
    def outcome(self) -> str:
        return "SKIP" if self.ok is None else "OK" if self.ok else "FAIL"


def compare(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, floor: float = FLOOR) -> tuple[float, float]:
    """``(max|out - ref_hi|, 2 * max|ref_lo - ref_hi| + floor)``; the error is inf for a wrong shape or non-finite values."""
    tolerance = floor
    if ref_lo.numel():
        tolerance += 2 * (ref_lo.double() - ref_hi.double()).abs().max().item()
    if out.shape != ref_hi.shape or not torch.isfinite(out).all():
        return float("inf"), tolerance
    if out.numel() == 0:
        return 0.0, tolerance
    return (out.double() - ref_hi.double()).abs().max().item(), tolerance


# ------------------------------------------------------------------ the op cases

@dataclasses.dataclass(frozen=True)
class OpCase:
    """How to call one op (``op`` names its :data:`~mae_fast.ops.IMPLEMENTATIONS` entry) on random inputs.

    ``make(shape, gen)`` returns CPU tensors: float ones in float32 (cast to the test dtype unless
    named in ``keep``), index and uint8 tensors as they are. ``diff`` names the inputs whose
    gradients are checked; ``static`` gives the other keyword arguments.
    """

    name: str
    op: str
    fn: Callable
    make: Callable[[OpShape, torch.Generator], dict]
    diff: tuple[str, ...]
    keep: tuple[str, ...] = ()
    static: Callable[[OpShape, torch.dtype], dict] = lambda shape, dtype: {}  # for a run in dtype (float64: ref_hi)


def _ids(shape: OpShape, gen: torch.Generator):
    noise = torch.rand(shape.batch, shape.num_patches, generator=gen)
    return sample_mask(shape.batch, shape.num_patches, shape.mask_ratio, noise=noise)


def _imgs(shape: OpShape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape.batch, shape.channels, shape.height, shape.width, generator=gen)


def _pixels(shape: OpShape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (shape.batch, shape.channels, shape.height, shape.width), generator=gen,
                         dtype=torch.uint8)


def _stats(shape: OpShape) -> dict:
    return {"mean": list(IMAGENET_MEAN_255[:shape.channels]) + [127.5] * max(0, shape.channels - 3),
            "std": list(IMAGENET_STD_255[:shape.channels]) + [64.0] * max(0, shape.channels - 3)}


def _loss_inputs(shape: OpShape, gen: torch.Generator, pixels: bool) -> dict:
    _, _, mask = _ids(shape, gen)
    return {"pred": torch.randn(shape.batch, 1 + shape.num_patches, shape.patch_dim, generator=gen),
            "imgs": _pixels(shape, gen) if pixels else _imgs(shape, gen), "mask": mask}


OP_CASES = (
    OpCase("gather_patches", "gather_patches", gather_patches,
           lambda s, g: {"imgs": _imgs(s, g), "ids_keep": _ids(s, g)[0]}, ("imgs",),
           static=lambda s, dtype: {"patch_size": s.patch_size, "check_indices": False}),
    OpCase("gather_patches[uint8]", "gather_patches", gather_patches,
           lambda s, g: {"imgs": _pixels(s, g), "ids_keep": _ids(s, g)[0]}, (),
           static=lambda s, dtype: {"patch_size": s.patch_size, "check_indices": False, "out_dtype": dtype,
                                    **_stats(s)}),
    OpCase("gather_tokens", "gather_tokens", gather_tokens,
           lambda s, g: {"x": torch.randn(s.batch, s.num_patches, s.dim, generator=g), "ids_keep": _ids(s, g)[0]},
           ("x",), static=lambda s, dtype: {"check_indices": False}),
    OpCase("add_pos_embed", "add_pos_embed", add_pos_embed,
           lambda s, g: {"x": torch.randn(s.batch, s.num_kept, s.dim, generator=g), "ids_keep": _ids(s, g)[0],
                         "pos_embed": torch.randn(s.num_patches, s.dim, generator=g)},
           ("x", "pos_embed"), keep=("pos_embed",), static=lambda s, dtype: {"check_indices": False}),
    OpCase("restore_tokens", "restore_tokens", restore_tokens,
           lambda s, g: {"x_visible": torch.randn(s.batch, s.num_kept, s.decoder_dim, generator=g),
                         "ids_restore": _ids(s, g)[1], "mask_token": torch.randn(s.decoder_dim, generator=g),
                         "pos_embed": torch.randn(s.num_patches, s.decoder_dim, generator=g)},
           ("x_visible", "mask_token", "pos_embed"), keep=("mask_token", "pos_embed"),
           static=lambda s, dtype: {"check_indices": False, "out_dtype": torch.promote_types(dtype, torch.float32)}),
    OpCase("masked_patch_loss", "masked_patch_loss", masked_patch_loss,
           lambda s, g: _loss_inputs(s, g, pixels=False), ("pred",), keep=("mask",),
           static=lambda s, dtype: {"patch_size": s.patch_size, "norm_pix": True, "pred_offset": 1}),
    OpCase("masked_patch_loss[uint8]", "masked_patch_loss", masked_patch_loss,
           lambda s, g: _loss_inputs(s, g, pixels=True), ("pred",), keep=("mask",),
           static=lambda s, dtype: {"patch_size": s.patch_size, "norm_pix": True, "pred_offset": 1, **_stats(s)}),
)


def _cast(inputs: dict, case: OpCase, device: torch.device, dtype: torch.dtype, grad: bool) -> dict:
    out = {}
    for name, value in inputs.items():
        if value.is_floating_point():
            value = value.to(device, dtype if name not in case.keep else value.dtype)
            value = value.clone().requires_grad_(grad and name in case.diff)
        else:
            value = value.to(device)
        out[name] = value
    return out


def _run(case: OpCase, backend: str, args: dict, static: dict, upstream: Callable[[torch.Tensor], torch.Tensor]):
    """[output, gradients of the inputs in ``case.diff``...] for the upstream gradient ``upstream(output)``."""
    out = case.fn(**args, backend=backend, **static)
    names = [n for n in case.diff if args[n].requires_grad]
    if not names:
        return [out.detach()]
    grads = torch.autograd.grad(out, [args[n] for n in names], upstream(out).to(out.dtype))
    return [out.detach(), *grads]


def check_op(case: OpCase, backend: str, shape: OpShape, device: torch.device, dtype: torch.dtype,
             seed: int = 0, floor: float = FLOOR) -> CheckResult:
    """Run ``case`` on ``backend`` in ``dtype`` and compare its output and gradients with the reference.

    The reported error and tolerance are those of the output or gradient that came closest to its
    limit. A backend that raises counts as a failure, with the error in ``note``.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    inputs = case.make(shape, gen)
    static = case.static(shape, dtype)
    drawn: list[torch.Tensor] = []

    def upstream(out: torch.Tensor) -> torch.Tensor:  # one draw, shared by the three runs
        if not drawn:
            drawn.append(torch.randn(out.shape, generator=gen).to(device))
        return drawn[0]

    try:
        ref_hi = _run(case, "torch", _cast(inputs, case, device, torch.float64, grad=True),
                      case.static(shape, torch.float64), upstream)
        ref_lo = _run(case, "torch", _cast(inputs, case, device, dtype, grad=True), static, upstream)
        got = _run(case, backend, _cast(inputs, case, device, dtype, grad=True), static, upstream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a backend that raises fails its check, with the reason
        return CheckResult(case.name, backend, _dtype_name(dtype), None, None, False, time.perf_counter() - start,
                           f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    worst = (0.0, floor)
    for out, hi_t, lo_t in zip(got, ref_hi, ref_lo):
        if out.dtype != lo_t.dtype:  # ref_hi is float64 throughout; the backend must give what the reference gives
            return CheckResult(case.name, backend, _dtype_name(dtype), None, None, False, time.perf_counter() - start,
                               f"dtype {out.dtype} where the reference gives {lo_t.dtype}")
        err, tol = compare(out, hi_t, lo_t, floor)
        if err / tol >= worst[0] / worst[1]:
            worst = (err, tol)
    return CheckResult(case.name, backend, _dtype_name(dtype), worst[0], worst[1], worst[0] <= worst[1],
                       time.perf_counter() - start)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def runnable_backends(op: str, device: torch.device) -> list[tuple[str, str | None]]:
    """``(backend, why it cannot run or None)`` for each kernel backend of ``op`` (the reference excluded)."""
    probe = [torch.empty(1, device=device)]
    out = []
    for backend in BACKEND_ORDER[:-1]:
        if backend not in IMPLEMENTATIONS[op]:
            continue
        out.append((backend, dispatch._why_not(backend, probe)))
    return out


# ------------------------------------------------------------------ the trainer's probe

def verify_kernel_backends(device: torch.device, dtype: torch.dtype, requested: str = "auto",
                           ops: Iterable[str] | None = None, shape: OpShape = PROBE_SHAPE,
                           warn: Callable[[str], None] | None = None) -> dict[str, str]:
    """The backend to run for each op, each one checked against the reference on a small probe first.

    The candidates for an op are its backends from ``requested`` on, in the order ``cuda`` ->
    ``triton`` -> ``torch`` (``auto``: all of them, kernels only on CUDA devices, as ``auto``
    itself chooses; an op without the requested backend starts at the next one). Each candidate
    that can run is probed on every variant of the op (float and uint8 images): the first that
    matches the reference is chosen; one that does not is reported through ``warn`` (one line
    naming the op, the backend and the error) and the next is tried. The reference is not probed.
    An explicitly requested backend that cannot run here at all is kept, so that the op raises
    :class:`~mae_fast.errors.BackendUnavailableError` with the reason at its first call.

    Returns:
        op name -> backend name, for every op in ``ops`` (default: all fused ops).
    """
    dispatch.check_backend(requested, "kernel_backend")
    chosen = {}
    for op in (list(ops) if ops is not None else list(IMPLEMENTATIONS)):
        why_not = dict(runnable_backends(op, device))
        if requested == "auto":
            candidates = [b for b in BACKEND_ORDER[:-1] if device.type == "cuda" and b in why_not and not why_not[b]]
        else:
            candidates = [b for b in BACKEND_ORDER[BACKEND_ORDER.index(requested):-1] if b in why_not]
            if candidates and why_not[candidates[0]]:
                chosen[op] = candidates[0]  # cannot run here: its first call says why
                continue
            candidates = [b for b in candidates if not why_not[b]]
        chosen[op] = "torch"
        for backend in candidates:
            failed = next((r for r in (check_op(c, backend, shape, device, dtype) for c in OP_CASES if c.op == op)
                           if not r.ok), None)
            if failed is None:
                chosen[op] = backend
                break
            detail = failed.note or f"max error {failed.max_error:.3g} over the tolerance {failed.tolerance:.3g}"
            if warn is not None:
                warn(f"{failed.check} on the {backend} backend does not match its reference on this machine "
                     f"({detail}); using the next backend instead")
    return chosen


# ------------------------------------------------------------------ the whole self-test

def check_attention(device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[CheckResult]:
    """Each attention backend that can run here against the math one (forward and input gradient)."""
    from mae_fast.attention import attention, flash_attn_unavailable_reason
    gen = torch.Generator().manual_seed(seed)
    B, N, H, Dh = (8, 50, 12, 64) if device.type == "cuda" else (2, 17, 3, 16)
    qkv = torch.randn(B, N, 3, H, Dh, generator=gen)
    upstream = torch.randn(B, N, H * Dh, generator=gen).to(device)
    results = []

    def run(backend: str, run_dtype: torch.dtype):
        x = qkv.to(device, run_dtype).requires_grad_(True)
        out = attention(x, backend)
        (grad,) = torch.autograd.grad(out, [x], upstream.to(out.dtype))
        return [out.detach(), grad]

    for backend in ("flash_attn", "sdpa"):
        start = time.perf_counter()
        reason = flash_attn_unavailable_reason(device, dtype, Dh) if backend == "flash_attn" else None
        if reason:
            results.append(CheckResult(f"attention[{backend}]", backend, _dtype_name(dtype), None, None, None, 0.0,
                                       reason))
            continue
        try:
            got, ref_lo, ref_hi = run(backend, dtype), run("math", dtype), run("math", torch.float64)
        except Exception as exc:
            results.append(CheckResult(f"attention[{backend}]", backend, _dtype_name(dtype), None, None, False,
                                       time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        pairs = [compare(g, h, lo) for g, h, lo in zip(got, ref_hi, ref_lo)]
        err, tol = max(pairs, key=lambda p: p[0] / p[1])
        results.append(CheckResult(f"attention[{backend}]", backend, _dtype_name(dtype), err, tol, err <= tol,
                                   time.perf_counter() - start, "against math"))
    return results


def check_decoding(device: torch.device, count: int = 4, size: int = 64) -> CheckResult:
    """DALI's JPEG decoding (``mixed`` on a GPU, ``cpu`` elsewhere) of a few built-in scenes against PIL's.

    Decoders may round the inverse DCT differently: the tolerance is 8 levels at any pixel, and the
    mean difference must stay under 1 level (reported in ``note``).
    """
    import numpy as np
    from PIL import Image

    from mae_fast.data.builtin import CLASSES, render_scene
    from mae_fast.data.dali_loader import dali_unavailable_reason

    start = time.perf_counter()
    mode = "mixed" if device.type == "cuda" else "cpu"
    reason = dali_unavailable_reason()
    if reason:
        return CheckResult("DALI decode", mode, "uint8", None, None, None, 0.0, reason)
    from nvidia.dali import fn, pipeline_def, types

    encoded = []
    for i in range(count):
        buffer = io.BytesIO()
        render_scene(np.random.default_rng([7, i]), size, CLASSES[i % len(CLASSES)]).save(buffer, "JPEG", quality=90)
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    expected = [np.asarray(Image.open(io.BytesIO(e.tobytes())).convert("RGB")) for e in encoded]

    @pipeline_def(batch_size=count, num_threads=1, device_id=device.index or 0 if device.type == "cuda" else None,
                  prefetch_queue_depth=1)
    def pipe():
        return fn.decoders.image(fn.external_source(source=lambda: encoded, dtype=types.UINT8), device=mode,
                                 output_type=types.RGB)

    try:
        p = pipe()
        p.build()
        (out,) = p.run()
        if mode == "mixed":
            out = out.as_cpu()
        decoded = [np.asarray(out[i]) for i in range(count)]
    except Exception as exc:
        return CheckResult("DALI decode", mode, "uint8", None, None, False, time.perf_counter() - start,
                           f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    diffs = [np.abs(d.astype(np.int16) - e.astype(np.int16)) if d.shape == e.shape else None
             for d, e in zip(decoded, expected)]
    if any(d is None for d in diffs):
        return CheckResult("DALI decode", mode, "uint8", None, None, False, time.perf_counter() - start,
                           "decoded shapes differ from PIL's")
    worst, mean = max(int(d.max()) for d in diffs), max(float(d.mean()) for d in diffs)
    return CheckResult("DALI decode", mode, "uint8", float(worst), 8.0, worst <= 8 and mean < 1.0,
                       time.perf_counter() - start, f"against PIL, mean difference {mean:.2f} levels")


def check_training_step(device: torch.device, compile_backend: str | None = None) -> CheckResult:
    """One compiled training step of the tiny preset (uint8 images, as the loaders deliver them) against eager.

    The loss and every gradient of the compiled step must match the eager step's within the
    reference rule (eager in the run dtype as ``ref_lo``, eager in float32 without autocast as
    ``ref_hi``), with a floor relative to each tensor's largest value. ``compile_backend``: inductor on GPUs, ``aot_eager`` on CPUs by default (inductor
    compiles for minutes there).
    """
    from mae_fast import create_model

    start = time.perf_counter()
    backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", img_size=32, norm_pix_loss=True).to(device)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (4, 3, 32, 32), generator=gen, dtype=torch.uint8).to(device)
    noise = torch.rand(4, model.num_patches, generator=gen).to(device)

    def step(fn, autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast and dtype != torch.float32):
            loss = fn(imgs, mask_ratio=0.75, noise=noise, return_pred=False)[0]
        loss.backward()
        return [loss.detach().float()] + [p.grad.detach().float().clone() for p in model.parameters()
                                          if p.grad is not None]

    try:
        ref_hi = step(model, autocast=False)
        ref_lo = step(model, autocast=True)
        got = step(torch.compile(model, fullgraph=True, backend=backend), autocast=True)
    except Exception as exc:
        return CheckResult("training step (compiled)", backend, _dtype_name(dtype), None, None, False,
                           time.perf_counter() - start, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    # Compilation reorders and fuses the bf16 arithmetic: beyond the rule, one bf16 step at the tensor's largest
    # value is allowed (a wrong kernel is off by far more); float32 gets a relative floor of 1e-5.
    relative = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
    pairs = [compare(g, h, lo, floor=relative * max(h.abs().max().item(), 1e-6)) for g, h, lo in zip(got, ref_hi, ref_lo)]
    err, tol = max(pairs, key=lambda p: p[0] / p[1])
    return CheckResult("training step (compiled)", backend, _dtype_name(dtype), err, tol, err <= tol,
                       time.perf_counter() - start, f"loss and {len(got) - 1} gradients against eager")


def run_checks(device: torch.device, dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
               shape: OpShape | None = None, interpret_triton: bool = False, step: bool = True,
               report: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Every check that can run on ``device``; the ones that cannot are returned as skipped, with the reason.

    Args:
        shape: the op shape (default: :data:`GPU_CHECK_SHAPE` on a GPU, :data:`PROBE_SHAPE` elsewhere).
        interpret_triton: on a CPU, also run the Triton kernels in the interpreter (slow: minutes);
            needs ``TRITON_INTERPRET=1`` set before Triton kernels were first imported.
        step: include the compiled training step.
        report: called with each result as it is made (for a table that grows as checks finish).
    """
    shape = shape or (GPU_CHECK_SHAPE if device.type == "cuda" else PROBE_SHAPE)
    results = []

    def add(result: CheckResult) -> None:
        results.append(result)
        if report is not None:
            report(result)

    for case in OP_CASES:
        for backend, reason in runnable_backends(case.op, device):
            interpreted = backend == "triton" and device.type != "cuda"
            if interpreted and not interpret_triton:
                reason = reason or "the Triton interpreter is slow on a CPU: pass --interpret to include it"
            for dtype in dtypes:
                if reason:
                    add(CheckResult(case.name, backend, _dtype_name(dtype), None, None, None, 0.0, reason))
                else:
                    add(check_op(case, backend, shape, device, dtype))
    for dtype in dtypes:
        if dtype != torch.float32 or device.type != "cuda":  # attention in the dtype training runs it in
            for result in check_attention(device, dtype):
                add(result)
    add(check_decoding(device))
    if step:
        add(check_training_step(device))
    return results


def format_row(result: CheckResult) -> str:
    """One Markdown table row: check, backend, dtype, max error, tolerance, result, time, note."""
    err = "-" if result.max_error is None else f"{result.max_error:.3g}"
    tol = "-" if result.tolerance is None else f"{result.tolerance:.3g}"
    return (f"| {result.check} | {result.backend} | {result.dtype} | {err} | {tol} | {result.outcome} | "
            f"{result.seconds:.2f}s | {result.note} |")


TABLE_HEADER = ("| check | backend | dtype | max error | tolerance | result | time | note |\n"
                "|---|---|---|---:|---:|---|---:|---|")
