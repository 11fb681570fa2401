"""``python -m mae_fast.info``: what mae_fast will run on this machine.

Prints the versions, the device, the backend each fused op and the attention resolve to, and runs
one masked forward and backward of a small MAE on a random batch to show the model working.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time

import torch

import mae_fast
from mae_fast import create_model
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mae_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mae_vit_tiny_patch16", help="preset to run (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="images in the demo batch (default: %(default)s)")
    args = parser.parse_args(argv)

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
