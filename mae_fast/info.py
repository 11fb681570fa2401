"""``python -m mae_fast.info``: what mae_fast will run on this machine, and whether it computes right here.

Without flags: the versions, the device, the backend each fused op and the attention resolve to,
and one masked forward and backward of a small MAE on a random batch to show the model working.

``--check``: the self-test (:mod:`mae_fast.selfcheck`). On the machine's GPU it runs every fused
op on every backend that can run (CUDA, Triton) in float32 and bf16 at ViT-B/16's shapes against
the reference, every attention backend against the math one, DALI's ``mixed`` JPEG decoding of a
few built-in scenes against PIL's, and one compiled training step against the eager one; one
table row per check (backend, dtype, max error, tolerance, OK/FAIL/SKIP, time). On a CPU it runs
what the CPU can (attention, DALI's CPU decoding, the step compiled with ``aot_eager``; Triton in
the interpreter with ``--interpret``) and lists what it skipped, with the reason. The exit code is
1 when any check fails, 0 otherwise.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time

import torch

import mae_fast
from mae_fast import create_model
from mae_fast.cli import CommandParser
from mae_fast.fp8 import fp8_unavailable_reason
from mae_fast.ops import IMPLEMENTATIONS, dispatch


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__  # not __import__: it returns the top package
    except Exception:
        return "not installed"


def op_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The backend ``auto`` picks for each fused op on inputs of ``device`` and ``dtype``."""
    probe = [torch.empty(1, device=device, dtype=dtype)]
    return {name: dispatch.choose(name, "auto", impls, probe) for name, impls in IMPLEMENTATIONS.items()}


def run_self_test(interpret: bool = False, quick: bool = False) -> int:
    """Print the self-test's table as checks finish; return the exit code (1 if any check failed)."""
    from mae_fast import selfcheck
    if interpret:  # the interpreter truncates float32 -> bf16 where GPUs round: check the kernels, not the emulator
        from mae_fast.kernels._launch import round_interpreted_bf16_like_the_gpu
        round_interpreted_bf16_like_the_gpu()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"mae_fast {mae_fast.__version__} self-test on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f" (torch {torch.__version__}, triton {_version('triton')})")
    print(selfcheck.TABLE_HEADER, flush=True)
    start = time.perf_counter()
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    results = selfcheck.run_checks(device, dtypes=dtypes, interpret_triton=interpret, step=not quick,
                                   report=lambda r: print(selfcheck.format_row(r), flush=True))
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in ("OK", "FAIL", "SKIP")}
    print(f"\n{counts['OK']} OK, {counts['FAIL']} FAIL, {counts['SKIP']} skipped, in "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if counts["FAIL"] else 0


def build_parser() -> CommandParser:
    """The command line of ``python -m mae_fast.info``."""
    parser = CommandParser("mae_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mae_vit_tiny_patch16", help="preset to run (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="images in the demo batch (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="run the self-test: every fused op, attention backend and decoder against its reference")
    parser.add_argument("--interpret", action="store_true",
                        help="with --check on a CPU: also run the Triton kernels in the interpreter (minutes)")
    parser.add_argument("--quick", action="store_true",
                        help="with --check: float32 only and no compiled training step")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.check and args.interpret and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # Triton decides between compiling and interpreting when triton.language is first imported, which
        # has happened by now: start again with the interpreter on.
        os.execve(sys.executable, [sys.executable, "-m", "mae_fast.info", *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if args.check:
        sys.exit(run_self_test(args.interpret, args.quick))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"mae_fast {mae_fast.__version__}  torch {torch.__version__}  triton {_version('triton')}  "
          f"python {platform.python_version()}")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}  compute dtype: {dtype}")
    print(f"flash_attn: {_version('flash_attn')}  DALI: {_version('nvidia.dali')}  torchao: {_version('torchao')}")
    fp8_reason = fp8_unavailable_reason(device)
    print(f"--precision fp8: {'available' if fp8_reason is None else 'not here: ' + fp8_reason}")
    for op, backend in op_backends(device, dtype).items():
        print(f"  {op:<18} -> {backend}")

    model = create_model(args.model).to(device)
    print(f"model: {args.model}, {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable "
          f"parameters, attention -> {model.attn_backend_for(device, dtype)}, "
          f"{model.flops_per_image() / 1e9:.1f} GFLOP per training image")
    imgs = torch.randn(args.batch_size, 3, *model.patch_embed.img_size, device=device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        loss, pred, mask = model(imgs)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"one forward+backward on {args.batch_size} random images: loss {loss.item():.4f}, "
          f"pred {tuple(pred.shape)}, {int(mask.sum().item())} patches masked, "
          f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
