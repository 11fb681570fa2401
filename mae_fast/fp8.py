"""FP8 training of the transformer blocks' linear layers, through torchao.float8.

``--precision fp8`` runs the step under bf16 autocast and swaps each linear layer inside the
encoder and decoder blocks (qkv, proj, fc1, fc2) for torchao's ``Float8Linear``: inputs, weights
and output gradients are cast to float8 with dynamic scales and multiplied on FP8 tensor cores,
twice bf16's peak on Hopper, Ada and Blackwell GPUs. The patch embedding, ``decoder_embed`` and the
pixel head stay in bf16. ``Float8Linear`` keeps ``nn.Linear``'s parameters, so ``state_dict()``
keys stay the official ones and checkpoints move freely between fp8 and bf16 runs.

Recipes (``--fp8_recipe``), torchao's names:

- ``tensorwise`` (default): one scale per tensor: the cheapest scales, weights all-gathered in
  float8 under FSDP2, and torchtitan's default recipe.
- ``rowwise``: one scale per row, power-of-two scales: more robust to outliers, more scaling work.

Which recipe is faster here is for the step benchmark to say on a GPU; it has not run yet.

FP8 matmuls pay off only when the casts are fused, so use it with ``--compile`` (eager runs work
but are slower than bf16). On CPUs and GPUs without FP8 tensor cores it is refused, except with
``--fp8_emulate``, which emulates the FP8 matmuls in high precision (bit-faithful casts, slow):
that is how the tests check the numerics on CPUs.

Not yet measured on a GPU in this project: the speed, and FSDP's float8 all-gather.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mae_fast.errors import install_hint

FP8_RECIPES = ("tensorwise", "rowwise")
#: Compute capability of the first GPUs with FP8 tensor cores (Ada; Hopper is 9.0).
MIN_CAPABILITY = (8, 9)


def torchao_unavailable_reason() -> str | None:
    """Why torchao's float8 training cannot be imported, or None."""
    try:
        import torchao.float8  # noqa: F401
    except Exception as exc:
        return f"torchao is not importable ({type(exc).__name__}: {exc}); install it with {install_hint('fp8')}"
    return None


def fp8_unavailable_reason(device: torch.device, emulate: bool = False) -> str | None:
    """Why FP8 training cannot run on ``device`` (torchao missing, a CPU, a GPU without FP8 tensor cores), or None."""
    reason = torchao_unavailable_reason()
    if reason or emulate:
        return reason
    if device.type != "cuda":
        return (f"it needs a GPU with FP8 tensor cores (compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: "
                f"Ada, Hopper, Blackwell) and this device is {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has no "
                f"FP8 tensor cores; they start at {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper, Blackwell)")
    return None


def is_fp8_linear(module: nn.Module, name: str) -> bool:
    """The conversion rule: a linear layer inside an encoder or decoder block with both dimensions divisible by 16
    (the FP8 matmul's alignment). The patch embedding (not a Linear), ``decoder_embed`` and ``decoder_pred`` stay."""
    return (isinstance(module, nn.Linear) and name.startswith(("blocks.", "decoder_blocks."))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False,
                   fsdp_float8_all_gather: bool = False) -> list[str]:
    """Swap the block linears of ``model`` (in place) for torchao ``Float8Linear``; returns their names.

    Call it before FSDP wrapping and ``torch.compile``.

    Args:
        model: an :class:`~mae_fast.model.MAEViT`.
        recipe: "tensorwise" or "rowwise" (see the module docstring).
        emulate: emulate the FP8 matmuls (CPUs and older GPUs; for tests, slow).
        fsdp_float8_all_gather: all-gather FSDP2-sharded weights in float8 (tensorwise only).

    Raises:
        ValueError: unknown recipe, or the float8 all-gather with rowwise scaling.
        RuntimeError: torchao is not importable (the message names the extra to install).
    """
    if recipe not in FP8_RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(FP8_RECIPES)}, got {recipe!r}")
    if fsdp_float8_all_gather and recipe != "tensorwise":
        raise ValueError("the float8 all-gather of FSDP weights needs the tensorwise recipe")
    reason = torchao_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate,
                                 enable_fsdp_float8_all_gather=fsdp_float8_all_gather)
    converted = [name for name, module in model.named_modules() if is_fp8_linear(module, name)]
    convert_to_float8_training(model, module_filter_fn=is_fp8_linear, config=config)
    return converted


def precompute_fsdp_scales(model: nn.Module) -> None:
    """After an optimizer step with the float8 all-gather: compute the next step's weight scales in one pass
    (torchao's recommendation; otherwise each rank computes them inside the all-gather)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
