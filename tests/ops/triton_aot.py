"""Compile every Triton kernel launch for a GPU architecture, on a machine without a GPU.

The Triton interpreter that runs the kernels on CPUs accepts programs the real compiler rejects
(types, layouts, constexpr use), so this script checks what only a GPU run would otherwise show:
it calls the kernel modules' launchers at MAE shapes with Triton's launch entry points replaced by
a recorder (nothing runs), turns each recorded launch into the signature and constants Triton's
runtime would give it, and compiles it for ``--arch`` down to a cubin, for the first and the last
of the fixed launch rule the training path uses, and for the first and the last of the autotune
configurations the benchmarks may opt into (the smallest and the largest tiles and warp counts).

    python tests/ops/triton_aot.py --arch 90 [--arch 80] [--all-configs]

Prints one JSON object: the kernels compiled, the number of compilations, the failures (kernel,
configuration, error), and per kernel the float32 divide, reciprocal and square-root instructions
its PTX holds (``ptx_float_math``), which show whether it rounds as IEEE says (``div.rn.f32``,
``sqrt.rn.f32``) or approximately (``div.full.f32``, ``sqrt.approx.f32``, ``rsqrt.approx``).
Run with ``TRITON_INTERPRET`` unset (the script refuses otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_aot.py compiles real kernels: run it with TRITON_INTERPRET unset")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

from mae_fast.kernels import gather_patches, gather_tokens, masked_patch_loss, restore_tokens  # noqa: E402
from mae_fast.ops.sample_mask import sample_mask  # noqa: E402
from mae_fast.ops.shapes import MAE_SHAPES, OpShape  # noqa: E402

LAUNCHES: list[tuple[JITFunction, list, tuple, dict]] = []
#: Float32 divides, reciprocals and square roots in PTX, with their rounding modifiers.
FLOAT_MATH = re.compile(r"\b((?:div|rcp|sqrt|rsqrt)(?:\.[a-z]+)*\.f32)\b")


def _record_jit(self, *args, grid, warmup, **kwargs):
    LAUNCHES.append((self, [None], args, kwargs))


def _record_autotuned(self, *args, grid=None, warmup=False, **kwargs):
    LAUNCHES.append((self.fn, list(self.configs), args, kwargs))


def record_launches(batch: int = 2) -> None:
    """Call every launcher the ops use, at each MAE shape, in the dtypes and modes the model uses.

    Twice: with the fixed launch rule of the training path, and with autotuning on (the benchmarks' opt-in).
    """
    JITFunction.run = _record_jit
    Autotuner.run = _record_autotuned
    for autotune in ("0", "1"):
        os.environ["MAE_FAST_TRITON_AUTOTUNE"] = autotune
        _call_launchers(batch)
    os.environ.pop("MAE_FAST_TRITON_AUTOTUNE")


#: The widest patch row the Triton kernels take (p = 32 with 3 channels: 3,072 values in a 4,096 tile,
#: ``dispatch.TRITON_MAX_TILE``); wider ones go to another backend.
WIDEST = OpShape("p32", 2, 3, 64, 64, 32, 0.75, 64, 64)


def _call_launchers(batch: int) -> None:
    _call_patch_launchers(batch, WIDEST)
    for shape in MAE_SHAPES:
        B, L, P, C = batch, shape.num_patches, shape.patch_size, shape.channels
        K, N = shape.num_kept, shape.patch_dim
        ids_keep, ids_restore, mask = sample_mask(B, L, shape.mask_ratio)
        imgs = torch.randn(B, C, shape.height, shape.width)
        pixels = torch.randint(0, 256, (B, shape.height, shape.width, C), dtype=torch.uint8).permute(0, 3, 1, 2)
        norm = torch.ones(2, C)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            gather_patches.gather_patches_forward(imgs.to(dtype), ids_keep, P, None, dtype)
            gather_patches.gather_patches_forward(pixels, ids_keep, P, norm, dtype)
            gather_patches.gather_patches_backward(torch.randn(B, K, N, dtype=dtype), ids_keep, P, shape.height,
                                                   shape.width, torch.float32)
            x = torch.randn(B, L, shape.dim, dtype=dtype)
            for pos in (torch.randn(L, shape.dim), None):
                gather_tokens.gather_tokens_forward(x, ids_keep, pos)
            gather_tokens.gather_tokens_forward(x[:, :K], ids_keep, torch.randn(L, shape.dim), gathered=True,
                                                out_dtype=torch.float32)  # add_pos_embed
            gather_tokens.gather_tokens_backward(torch.randn(B, K, shape.dim, dtype=dtype), ids_keep, L)
            Dd = shape.decoder_dim
            xv = torch.randn(B, K, Dd, dtype=dtype)
            for pos in (torch.randn(L, Dd), None):
                for out_dtype in {dtype, torch.float32}:  # float32: the decoder input under autocast
                    restore_tokens.restore_tokens_forward(xv, ids_restore, torch.randn(Dd), pos, out_dtype)
                    restore_tokens.restore_tokens_backward(torch.randn(B, L, Dd, dtype=out_dtype), ids_restore, K,
                                                           dtype)
            pred = torch.randn(B, 1 + L, N, dtype=dtype)
            for images, stats in ((imgs, None), (pixels, norm)):
                for norm_pix in (True, False):
                    masked_patch_loss.masked_patch_loss_forward(pred, images, stats, mask, P, 1, norm_pix, 1e-6)
                    for grads in ((True, False), (True, True)) if stats is None else ((True, False),):
                        masked_patch_loss.masked_patch_loss_backward(pred, images, stats, mask, torch.ones(()), P, 1,
                                                                     norm_pix, 1e-6, *grads)


def _call_patch_launchers(batch: int, shape: OpShape) -> None:
    """The patch-row kernels at one shape, in the training path's dtypes only (bf16 rows, uint8 pixels)."""
    B, L, P, C, K, N = batch, shape.num_patches, shape.patch_size, shape.channels, shape.num_kept, shape.patch_dim
    ids_keep, _, mask = sample_mask(B, L, shape.mask_ratio)
    pixels = torch.randint(0, 256, (B, C, shape.height, shape.width), dtype=torch.uint8)
    norm = torch.ones(2, C)
    gather_patches.gather_patches_forward(pixels, ids_keep, P, norm, torch.bfloat16)
    gather_patches.gather_patches_backward(torch.randn(B, K, N, dtype=torch.bfloat16), ids_keep, P, shape.height,
                                           shape.width, torch.float32)
    pred = torch.randn(B, 1 + L, N, dtype=torch.bfloat16)
    masked_patch_loss.masked_patch_loss_forward(pred, pixels, norm, mask, P, 1, True, 1e-6)
    masked_patch_loss.masked_patch_loss_backward(pred, pixels, norm, mask, torch.ones(()), P, 1, True, 1e-6, True,
                                                 False)


def variants(all_configs: bool):
    """Unique (kernel, signature, constants, options) to compile, from the recorded launches."""
    seen = {}
    for kernel, configs, args, kwargs in LAUNCHES:
        params = kernel.params
        values = dict(zip([p.name for p in params], args))
        values.update(kwargs)
        if not all_configs and len(configs) > 2:
            configs = [configs[0], configs[-1]]
        for config in configs:
            constants, signature = {}, {}
            merged = dict(values)
            options = {"num_warps": merged.pop("num_warps", 4), "num_stages": 3}
            if config is not None:
                merged.update(config.kwargs)
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            for p in params:
                value = merged[p.name]
                if p.is_constexpr:
                    signature[p.name], constants[p.name] = "constexpr", value
                    continue
                kind = mangle_type(value, not p.do_not_specialize)
                signature[p.name] = kind
                if kind == "constexpr":  # Triton specializes 1 and None to constants
                    constants[p.name] = value
            key = (kernel.fn.__qualname__, tuple(signature.items()), tuple(sorted(constants.items(), key=str)),
                   tuple(sorted(options.items())))
            seen.setdefault(key, (kernel, signature, constants, options))
    return list(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune configuration, not two")
    args = parser.parse_args()
    record_launches()
    todo = variants(args.all_configs)
    compiled, failures, kernels, float_math = 0, [], set(), {}
    start = time.perf_counter()
    for arch in args.arch or [90]:
        target = GPUTarget("cuda", arch, 32)
        for kernel, signature, constants, options in todo:
            name = kernel.fn.__qualname__
            try:
                result = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=target,
                                        options=options)
                assert result.asm.get("cubin"), "no cubin produced"
                compiled += 1
                kernels.add(name)
                float_math.setdefault(name, set()).update(FLOAT_MATH.findall(result.asm.get("ptx", "")))
            except Exception:
                failures.append({"kernel": name, "arch": arch, "signature": signature,
                                 "constants": {k: repr(v) for k, v in constants.items()}, "options": options,
                                 "error": traceback.format_exc(limit=3)[-2000:]})
    print(json.dumps({"triton": triton.__version__, "launches": len(LAUNCHES), "compiled": compiled,
                      "kernels": sorted(kernels), "failures": failures,
                      "ptx_float_math": {k: sorted(v) for k, v in sorted(float_math.items())},
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
