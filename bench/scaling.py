"""The scaling plan on paper: memory, communication and predicted efficiency of MAE pretraining, 8 to 1,024 GPUs.

    python bench/scaling.py                # Markdown tables, the assumptions first
    python bench/scaling.py --mfu 0.5 --gpu_memory_gb 141

For ViT-B/16, ViT-L/16, ViT-H/14 (the official presets with their 512-wide, 8-block decoder) and a
ViT-2B (stated below), at the official recipe (224 px, mask ratio 0.75, global batch 4,096), it
computes per GPU:

- memory: fp32 parameters, gradients and AdamW's two moments (16 bytes per parameter, divided by
  the ranks that shard them), plus activations at the per-GPU batch, with and without activation
  checkpointing (bf16 activations: 34 bytes per token and channel per block, after Korthikanti et
  al. 2022, with FlashAttention's scores not stored; with checkpointing, 2 bytes per token and
  channel per block plus one whole block during its recomputation);
- bytes each GPU sends per step, ring algorithms (all-reduce of S bytes over n ranks: 2(n-1)/n S;
  all-gather or reduce-scatter: (n-1)/n S): DDP all-reduces the fp32 gradients; FSDP all-gathers
  the bf16 parameters in forward and again in backward and reduce-scatters the fp32 gradients,
  over all ranks; HSDP does FSDP's within a node (NVLink) and all-reduces each rank's shard of the
  gradients across the nodes (InfiniBand);
- the time those bytes take (a ring that leaves the node runs at the InfiniBand rate per GPU),
  against the step's compute time at the stated MFU, and so the predicted scaling efficiency:
  compute / max(compute, communication) when communication overlaps compute (DDP's bucketed
  all-reduce and FSDP2's prefetching do), compute / (compute + communication) when it does not.

The global batch is fixed (4,096), so the per-GPU batch falls as GPUs are added (strong scaling),
and with it the compute that hides the communication. ``collective_payloads`` gives the bytes
handed to each kind of collective per step, which a test checks against gloo runs on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_fast.model import PRESETS, MAEViT  # noqa: E402

#: The models: name -> MAEViT arguments. ViT-2B as in MAE pre-pretraining (Singh et al. 2023): 2560 wide, 24 deep,
#: 32 heads, MLP 4x, 14-px patches; the official 512-wide, 8-block decoder.
MODELS = {
    "ViT-B/16": PRESETS["mae_vit_base_patch16"][1],
    "ViT-L/16": PRESETS["mae_vit_large_patch16"][1],
    "ViT-H/14": PRESETS["mae_vit_huge_patch14"][1],
    "ViT-2B/14": dict(patch_size=14, embed_dim=2560, depth=24, num_heads=32, decoder_embed_dim=512, decoder_depth=8,
                      decoder_num_heads=16, mlp_ratio=4),
}
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)
GLOBAL_BATCH, IMG_SIZE, MASK_RATIO = 4096, 224, 0.75
MICRO_BATCH = 64  # the official per-GPU batch: more images per GPU and step are accumulated in steps of this
GPUS_PER_NODE = 8
NVLINK_GB_S = 450.0  # H100/H200 SXM, NVLink 4: 18 links x 25 GB/s each way, per GPU
INFINIBAND_GB_S = 50.0  # one 400 Gb/s NDR adapter per GPU
PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16
ACT_BYTES_PER_TOKEN_CHANNEL = 34  # per block, bf16, FlashAttention (no stored scores)
CKPT_BYTES_PER_TOKEN_CHANNEL = 2  # per block with activation checkpointing: the block's bf16 input


@dataclass(frozen=True)
class ModelFacts:
    params: int
    flops_per_image: float  # training (forward + backward), matrix multiplies
    act_bytes_per_image: float  # without checkpointing
    ckpt_bytes_per_image: float  # with per-block checkpointing
    largest_block_params: int


def model_facts(arguments: dict) -> ModelFacts:
    """Parameter count, FLOPs and activation bytes per image of an MAE model with these arguments."""
    with torch.device("meta"):
        model = MAEViT(img_size=IMG_SIZE, **arguments)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    L = model.num_patches
    K = int(L * (1 - MASK_RATIO))
    D, Dd = arguments["embed_dim"], arguments["decoder_embed_dim"]
    enc, dec = (1 + K) * D * arguments["depth"], (1 + L) * Dd * arguments["decoder_depth"]
    act = ACT_BYTES_PER_TOKEN_CHANNEL * (enc + dec)
    recompute_one = ACT_BYTES_PER_TOKEN_CHANNEL * max((1 + K) * D, (1 + L) * Dd)
    ckpt = CKPT_BYTES_PER_TOKEN_CHANNEL * (enc + dec) + recompute_one
    block = max(sum(p.numel() for p in model.blocks[0].parameters()),
                sum(p.numel() for p in model.decoder_blocks[0].parameters()))
    return ModelFacts(params, model.flops_per_image(MASK_RATIO), act, ckpt, block)


def ring_allreduce(size: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``size`` bytes over ``n`` ranks."""
    return 2 * (n - 1) / n * size if n > 1 else 0.0


def ring_gather(size: float, n: int) -> float:
    """Bytes each rank sends in a ring all-gather (or reduce-scatter) of ``size`` bytes in all over ``n`` ranks."""
    return (n - 1) / n * size if n > 1 else 0.0


def collective_payloads(params: int, strategy: str, param_bytes: int = 2, grad_bytes: int = 4) -> dict[str, float]:
    """Bytes handed to each kind of collective per optimizer step, per rank, whatever the number of ranks.

    DDP: the gradients, all-reduced once (``all_reduce``). FSDP (and HSDP within its shard group):
    the full parameters all-gathered in forward and again in backward (``all_gather``, the output
    size), the full gradients reduce-scattered (``reduce_scatter``, the input size). The test
    compares these with what gloo runs hand to the collectives.
    """
    if strategy == "ddp":
        return {"all_reduce": params * grad_bytes}
    if strategy in ("fsdp", "hsdp"):
        return {"all_gather": 2 * params * param_bytes, "reduce_scatter": params * grad_bytes}
    raise ValueError(f"strategy must be ddp, fsdp or hsdp, got {strategy!r}")


def plan(name: str, gpus: int, mfu: float, gpu_memory_gb: float, global_batch: int = GLOBAL_BATCH) -> dict:
    """One row: per-GPU batch, memory, compute and communication times and predicted efficiency per strategy.

    A GPU's share of the global batch runs in micro-batches of at most :data:`MICRO_BATCH` images (gradient
    accumulation): activations are a micro-batch's; DDP all-reduces once per step; FSDP and HSDP all-gather the
    parameters in every micro-batch's forward and backward and reduce-scatter once per step (as the trainer
    does with ``set_requires_gradient_sync``).
    """
    facts = model_facts(MODELS[name])
    P = facts.params
    batch = global_batch / gpus
    micro = min(batch, MICRO_BATCH)
    accum = max(1, round(batch / micro))
    compute_s = facts.flops_per_image * batch / (PEAK_TFLOPS * 1e12 * mfu)
    nodes = max(1, gpus // GPUS_PER_NODE)
    group = min(gpus, GPUS_PER_NODE)
    across = INFINIBAND_GB_S if gpus > GPUS_PER_NODE else NVLINK_GB_S
    states = 16 * P  # fp32 parameters, gradients, AdamW moments
    comm = {
        "ddp": ring_allreduce(4 * P, gpus) / (across * 1e9),
        "fsdp": (ring_gather(2 * P, gpus) * 2 * accum + ring_gather(4 * P, gpus)) / (across * 1e9),
        "hsdp": (ring_gather(2 * P, group) * 2 * accum + ring_gather(4 * P, group)) / (NVLINK_GB_S * 1e9)
        + ring_allreduce(4 * P / group, nodes) / (INFINIBAND_GB_S * 1e9),
    }
    gathered = 2 * 2 * facts.largest_block_params  # two bf16 blocks' parameters held at once (prefetch)
    memory = {"ddp": states, "fsdp": states / gpus + gathered, "hsdp": states / group + gathered}
    row = {"model": name, "gpus": gpus, "batch": batch, "accum": accum, "params": P, "compute_ms": compute_s * 1e3}
    for strategy in ("ddp", "fsdp", "hsdp"):
        for ckpt in (False, True):
            act = (facts.ckpt_bytes_per_image if ckpt else facts.act_bytes_per_image) * micro
            row[f"{strategy}_mem_gb{'_ckpt' if ckpt else ''}"] = (memory[strategy] + act) / 1e9
        row[f"{strategy}_comm_ms"] = comm[strategy] * 1e3
        row[f"{strategy}_eff"] = compute_s / max(compute_s, comm[strategy])
        row[f"{strategy}_eff_serial"] = compute_s / (compute_s + comm[strategy])
    fits = {s: row[f"{s}_mem_gb"] <= gpu_memory_gb or row[f"{s}_mem_gb_ckpt"] <= gpu_memory_gb
            for s in ("ddp", "fsdp", "hsdp")}
    choices = [s for s in ("ddp", "hsdp", "fsdp") if fits[s]]
    best = max(choices, key=lambda s: (round(row[f"{s}_eff"], 3), round(row[f"{s}_eff_serial"], 3))) \
        if choices else None
    row["choice"] = best or "none fits"
    if best and row[f"{best}_mem_gb"] > gpu_memory_gb:
        row["choice"] += " + checkpointing"
    return row


def table(name: str, mfu: float, gpu_memory_gb: float, global_batch: int | None) -> list[str]:
    """One model's rows: at the recipe's global batch, or (``global_batch=None``) at 64 images per GPU."""
    lines = ["| GPUs | batch/GPU (accum) | compute ms | memory GB DDP | FSDP | HSDP | comm ms DDP | FSDP | HSDP "
             "| efficiency DDP | FSDP | HSDP | use |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for gpus in GPU_COUNTS:
        r = plan(name, gpus, mfu, gpu_memory_gb, global_batch or MICRO_BATCH * gpus)
        mem = " | ".join(f"{r[f'{s}_mem_gb']:.1f} / {r[f'{s}_mem_gb_ckpt']:.1f}" for s in ("ddp", "fsdp", "hsdp"))
        comm = " | ".join(f"{r[f'{s}_comm_ms']:.1f}" for s in ("ddp", "fsdp", "hsdp"))
        eff = " | ".join(f"{r[f'{s}_eff']:.0%} ({r[f'{s}_eff_serial']:.0%})" for s in ("ddp", "fsdp", "hsdp"))
        lines.append(f"| {gpus:,} | {r['batch']:g} ({r['accum']}) | {r['compute_ms']:.1f} | {mem} | {comm} | {eff} | "
                     f"{r['choice']} |")
    return lines


def markdown(mfu: float, gpu_memory_gb: float) -> str:
    """The whole plan: assumptions, then per model a table at the recipe's batch and one at 64 images per GPU."""
    lines = ["# MAE pretraining at scale: a plan on paper (bench/scaling.py)", "",
             f"Assumptions: {IMG_SIZE} px, mask ratio {MASK_RATIO}; micro-batches of at most {MICRO_BATCH} images "
             f"per GPU (more are accumulated); {GPUS_PER_NODE} GPUs per node with {gpu_memory_gb:g} GB each; NVLink "
             f"{NVLINK_GB_S:g} GB/s and InfiniBand {INFINIBAND_GB_S:g} GB/s per GPU each way; dense bf16 peak "
             f"{PEAK_TFLOPS:g} TFLOP/s at {mfu:.0%} MFU; ring collectives; fp32 master weights, gradients and AdamW "
             "moments; bf16 activations. Memory is per GPU (activations without / with per-block checkpointing); "
             "times per optimizer step; efficiency = compute / max(compute, communication) (overlapped), and "
             "without overlap in brackets. 'use' is the most efficient strategy that fits.", ""]
    for name, arguments in MODELS.items():
        facts = model_facts(arguments)
        lines += [f"## {name}: {facts.params / 1e6:,.0f} M parameters (encoder and decoder), "
                  f"{facts.flops_per_image / 1e9:,.0f} GFLOP per training image", "",
                  f"At the recipe's global batch, {GLOBAL_BATCH:,} (strong scaling):", ""]
        lines += table(name, mfu, gpu_memory_gb, GLOBAL_BATCH)
        lines += ["", f"At {MICRO_BATCH} images per GPU, the global batch growing with the GPUs (weak scaling; "
                      "the lr follows by the linear rule):", ""]
        lines += table(name, mfu, gpu_memory_gb, None)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilization assumed (default: %(default)s)")
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0,
                        help="memory per GPU, for the choice of strategy (default: %(default)s, an H100)")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    print(markdown(args.mfu, args.gpu_memory_gb))


if __name__ == "__main__":
    main()
