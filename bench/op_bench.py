"""How every op benchmark runs: providers, modes, rotating inputs, GB/s from computed bytes.

Triton kernels launch with the training path's fixed rule; ``MAE_FAST_TRITON_AUTOTUNE=1`` opts
into autotuning, to see what a tuned configuration would gain.
"""

from __future__ import annotations

import pytest
import torch

from mae_fast.kernels._launch import autotuning
from mae_fast.ops import IMPLEMENTATIONS, dispatch
from mae_fast.ops.shapes import MAE_SHAPES, TEST_SHAPES
from bench_env import DEVICE, ON_GPU, copy_bandwidth, median_seconds, sync

PROVIDERS = ("torch", "torch-compile", "triton", "cuda")
MODES = ("forward", "backward", "forward+backward")
SHAPES = MAE_SHAPES if ON_GPU else TEST_SHAPES[:2]
SHAPE_IDS = [s.name for s in SHAPES]
ROTATIONS = 3  # distinct input sets cycled through, so no run finds its inputs in cache


def skip_reason(op: str, provider: str) -> str | None:
    if provider in ("torch", "torch-compile"):
        return None
    if not ON_GPU:
        return f"the {provider} provider needs a GPU (the Triton interpreter's speed means nothing)"
    if provider not in IMPLEMENTATIONS[op]:
        return f"{op} has no {provider} backend"
    return dispatch._why_not(provider, [torch.zeros(1, device=DEVICE)])


def run(benchmark, record, op: str, shape, provider: str, mode: str, make_inputs, call, diff: list[str],
        moved_bytes: dict[str, float], variant: str | None = None) -> None:
    """Benchmark ``call(backend, **inputs)`` for one provider and mode.

    Args:
        make_inputs: () -> dict of fresh inputs (float inputs named in ``diff`` get requires_grad).
        call: (backend, **inputs) -> output tensor.
        moved_bytes: the op module's ``bytes_moved(...)``: what its kernels move per pass ("forward",
            "backward") and the least any implementation moves ("floor", forward and backward).
        variant: what distinguishes this case from the op's others (reported as ``op[variant]``).
    """
    reason = skip_reason(op, provider)
    if reason:
        pytest.skip(reason)
    backend = "torch" if provider.startswith("torch") else provider
    fn = (lambda **kw: call(backend, **kw))
    if provider == "torch-compile":
        # Every benchmark compiles the same wrapper code: start from an empty cache so no guard
        # failure or recompilation limit leaks into the timed rounds.
        torch._dynamo.reset()
        fn = torch.compile(fn, dynamic=False)
    need_grad = mode != "forward"
    sets = []
    for _ in range(ROTATIONS):
        inputs = make_inputs()
        for name in diff:
            inputs[name].requires_grad_(need_grad)
        sets.append(inputs)
    grads = [None] * ROTATIONS
    outputs = [None] * ROTATIONS
    if mode == "backward":
        for i, inputs in enumerate(sets):
            outputs[i] = fn(**inputs)
            grads[i] = torch.randn_like(outputs[i])
    counter = {"i": 0}

    def step():
        i = counter["i"] % ROTATIONS
        counter["i"] += 1
        inputs = sets[i]
        if mode == "forward":
            with torch.no_grad():
                fn(**inputs)
        elif mode == "backward":
            torch.autograd.grad(outputs[i], [inputs[n] for n in diff], grads[i], retain_graph=True)
        else:
            out = fn(**inputs)
            torch.autograd.grad(out, [inputs[n] for n in diff], torch.ones_like(out))
        sync()

    for _ in range(2):  # warm-up (and compilation) outside the timed rounds
        step()
    benchmark.pedantic(step, rounds=20 if ON_GPU else 3, iterations=1, warmup_rounds=1)
    # Bandwidth from computed bytes (the op module's count of what its kernels move), for every provider alike.
    moved = moved_bytes["forward"] * (mode != "backward") + moved_bytes["backward"] * (mode != "forward")
    seconds = median_seconds(benchmark)
    figures = {"op": f"{op}[{variant}]" if variant else op, "shape": shape.name, "provider": provider, "mode": mode, "bytes_moved": moved,
               "floor_bytes": moved_bytes["floor"], "kernel_launch": "autotuned" if autotuning() else "fixed rule"}
    if seconds:
        bandwidth = copy_bandwidth()
        figures.update(median_ms=seconds * 1e3, gb_per_s=moved / seconds / 1e9, copy_gb_per_s=bandwidth / 1e9,
                       fraction_of_copy_bandwidth=moved / seconds / bandwidth)
    record(**figures)


def float_dtype() -> torch.dtype:
    """Activations are bf16 on GPUs (autocast), float32 on CPUs."""
    return torch.bfloat16 if ON_GPU else torch.float32
