"""The scaling plan on paper: memory, communication and predicted efficiency of MAE pretraining, 8 to 1,024 GPUs.

    python bench/scaling.py > bench/results/scaling.md    # the plan as Markdown, its assumptions first
    python bench/scaling.py --mfu 0.5 --gpu_memory_gb 141 --infiniband_gb_s 25

A model, not a measurement: nothing here has run on a GPU. What the CPU can check, tests/test_scaling.py
checks: the bytes each rank hands to each kind of collective in a training step's forward and backward
under DDP, FSDP2 and HSDP (gloo, 2 and 4 ranks, against :func:`collective_payloads`; the optimizer's update
communicates nothing), and the activation bytes per token and channel of a block (against
:data:`ACT_BYTES_PER_TOKEN_CHANNEL`).

For ViT-B/16, ViT-L/16, ViT-H/14 (the official presets with their 512-wide, 8-block decoder) and a
ViT-2B (stated in :data:`MODELS`), at the official recipe (224 px, mask ratio 0.75, global batch 4,096,
at most 64 images per GPU and micro-batch), it computes per GPU:

- memory. DDP: fp32 parameters, gradients and AdamW's two moments (16 bytes per parameter), DDP's
  gradient buckets (4: the engine leaves ``gradient_as_bucket_view`` off, DDP's default) and autocast's
  bf16 copies of the weights, kept for the backward (2). FSDP2 over n ranks: the 16 bytes sharded, each
  parameter's first dimension padded to a multiple of n as FSDP2 shards it; what is gathered at a time:
  the root's parameters (the embeddings and heads, gathered once per forward and kept for the backward),
  two blocks' bf16 parameters (one computing, the next prefetched), one block's gradients in bf16 and
  in fp32 (the reduce-scatter's input); with gradient accumulation, the unsharded fp32 gradients FSDP2
  accumulates between syncs (``set_requires_gradient_sync(False)``, 4 bytes per parameter). HSDP:
  FSDP's, sharded within a node and replicated across nodes (``--fsdp_replicate`` = the nodes).
  Activations of a micro-batch: see :data:`ACT_BYTES_PER_TOKEN_CHANNEL`; with per-block checkpointing
  (``--grad_checkpointing``) each block keeps only its fp32 input, one block's activations exist during
  its recomputation, and the forward runs twice (4/3 of the compute).
- the collectives of one optimizer step (:func:`step_collectives`). DDP all-reduces the fp32 gradients
  once (in 25 MB buckets, DDP's default) and broadcasts the model's buffers in every forward. FSDP
  all-gathers each block's bf16 parameters in the forward and again in the backward and the root's once,
  in every micro-batch, and reduce-scatters the fp32 gradients once per step. HSDP does FSDP's within a
  node, then all-reduces each rank's gradient shard across the nodes.
- the bytes each GPU sends (ring algorithms: an all-reduce of S bytes over n ranks sends 2(n-1)/n S, an
  all-gather or reduce-scatter (n-1)/n S) and the time they take: bytes sent / bandwidth + latency.
  Within a node the bandwidth is NVLink's. Each GPU has its own InfiniBand adapter and a collective's
  rings leave a node through all of its GPUs' adapters, so a collective with k GPUs in each node runs
  at min(NVLink, k x InfiniBand) per GPU: 400 GB/s for one over whole nodes (NCCL's bus bandwidth
  across H100 nodes is of that order), 50 GB/s for HSDP's all-reduce (one GPU per node). Latency per
  call: a ring all-gather or reduce-scatter takes n - 1 steps, as many as there are nodes less one
  between nodes (InfiniBand's latency), the others within (NVLink's); an all-reduce or broadcast runs as
  a tree (NCCL's choice at scale): a chain through the node and a binary tree across the nodes.
- the step's compute at the stated MFU, and the predicted scaling efficiency: compute / (compute +
  the communication it cannot hide). DDP's all-reduce runs during the last micro-batch's backward;
  FSDP's all-gathers during each micro-batch's forward and backward (prefetched), its reduce-scatter
  (and HSDP's all-reduce) during the last backward. In brackets: compute / (compute + communication),
  nothing hidden.

The global batch is fixed (strong scaling: the per-GPU batch falls as GPUs are added, and with it the
compute that hides the communication); a second table per model keeps 64 images per GPU (weak scaling).
"""

from __future__ import annotations

import argparse
import functools
import math
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
STRATEGIES = ("ddp", "fsdp", "hsdp")
#: Saved for the backward per token and channel of a block under bf16 autocast: the residual stream's fp32
#: input to each of the two LayerNorms (4 + 4), their bf16 outputs as the qkv and fc1 matmuls cast them (2 + 2),
#: q, k and v (6), the attention's output (2; a fused attention keeps no scores), the MLP's hidden activation
#: before and after the GELU (8 + 8); MAE pretraining has no dropout. Counted with saved-tensor hooks.
ACT_BYTES_PER_TOKEN_CHANNEL = 36
CKPT_BYTES_PER_TOKEN_CHANNEL = 4  # with per-block checkpointing: the block's fp32 input
DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES = 1 << 20, 25 << 20  # DDP's defaults


@dataclass(frozen=True)
class Hardware:
    """The machine the plan assumes, per GPU. The defaults: an H100 SXM node (8 GPUs, NVLink 4, one 400 Gb/s NDR
    InfiniBand adapter per GPU)."""

    mfu: float = 0.4  # model FLOP utilization of the step's compute
    peak_tflops: float = 989.0  # dense bf16
    gpu_memory_gb: float = 80.0
    nvlink_gb_s: float = 450.0  # each way: 18 links x 25 GB/s
    infiniband_gb_s: float = 50.0  # each way, per GPU
    nvlink_step_us: float = 2.0  # latency of one step of a collective from GPU to GPU within a node
    infiniband_step_us: float = 5.0  # ... and from node to node


@dataclass(frozen=True)
class ShardUnit:
    """The parameters FSDP2 gathers and reduces together: a transformer block's, or the rest (the root)."""

    shapes: tuple[tuple[int, ...], ...]
    trainable: tuple[bool, ...]
    root: bool = False

    def numel(self, ranks: int = 1, trainable_only: bool = False) -> int:
        """Elements over ``ranks`` ranks as FSDP2 lays them out: each first dimension padded to a multiple of
        ``ranks`` (a (1, L+1, D) position embedding becomes ``ranks`` copies of itself)."""
        total = 0
        for shape, trainable in zip(self.shapes, self.trainable):
            if trainable or not trainable_only:
                dim0, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
                total += -(-dim0 // ranks) * ranks * rest
        return total


def shard_units(model: torch.nn.Module) -> list[ShardUnit]:
    """The model's FSDP2 units as pretraining wraps them (``MAETrainer.shard_units``): each encoder and decoder
    block, then the whole model, whose unit holds the parameters no block holds."""
    blocks = [*model.blocks, *model.decoder_blocks]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_blocks]

    def unit(params, root=False):
        params = list(params)
        return ShardUnit(tuple(tuple(p.shape) for p in params), tuple(p.requires_grad for p in params), root)

    return [*(unit(block.parameters()) for block in blocks), unit(rest, root=True)]


@dataclass(frozen=True)
class Collective:
    """One kind of collective in one optimizer step, on one process group."""

    kind: str  # all_gather | reduce_scatter | all_reduce | broadcast
    nbytes: int  # handed to it per rank and step, summed over calls: all-gather's output, reduce-scatter's input
    group: str  # world, or HSDP's shard (within a node) or replicate (across nodes)
    calls: int


def step_collectives(units: list[ShardUnit], strategy: str, ranks: int, replicas: int = 1, param_bytes: int = 2,
                     grad_bytes: int = 4, buffer_bytes: int = 0, micro_batches: int = 1) -> list[Collective]:
    """The collectives of one optimizer step of ``micro_batches`` micro-batches, as each rank calls them.

    ``param_bytes``: the dtype FSDP gathers (MixedPrecisionPolicy's param_dtype); ``grad_bytes``: the dtype
    gradients are reduced in; ``buffer_bytes``: the model's buffers, which DDP broadcasts in every forward.
    HSDP shards over ``ranks // replicas`` ranks and replicates over ``replicas``.

    Raises:
        ValueError: an unknown strategy, or ``replicas`` that do not divide ``ranks`` (or differ from 1 but for HSDP).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if ranks < 1 or replicas < 1 or ranks % replicas or (replicas > 1 and strategy != "hsdp"):
        raise ValueError(f"replicas ({replicas}) must divide ranks ({ranks}), and only HSDP replicates")
    if strategy == "ddp":
        grads = sum(unit.numel(trainable_only=True) for unit in units) * grad_bytes
        buckets = 1 + math.ceil(max(0, grads - DDP_FIRST_BUCKET_BYTES) / DDP_BUCKET_BYTES)
        out = [Collective("all_reduce", grads, "world", buckets)]
        if buffer_bytes:
            out.append(Collective("broadcast", buffer_bytes * micro_batches, "world", micro_batches))
        return out
    shard = ranks // replicas
    group = "shard" if strategy == "hsdp" else "world"
    gathers = [(1 if unit.root else 2) * micro_batches for unit in units]  # the root is not resharded after forward
    out = [Collective("all_gather", sum(g * unit.numel(shard) for g, unit in zip(gathers, units)) * param_bytes,
                      group, sum(gathers)),
           Collective("reduce_scatter", sum(unit.numel(shard, trainable_only=True) for unit in units) * grad_bytes,
                      group, len(units))]
    if strategy == "hsdp":
        out.append(Collective("all_reduce", out[1].nbytes // shard, "replicate", len(units)))
    return out


def collective_payloads(units: list[ShardUnit], strategy: str, ranks: int, replicas: int = 1, param_bytes: int = 2,
                        grad_bytes: int = 4, buffer_bytes: int = 0, micro_batches: int = 1) -> dict[str, int]:
    """Bytes each rank hands to each kind of collective in one optimizer step: {kind: bytes} of
    :func:`step_collectives` (same arguments)."""
    payloads: dict[str, int] = {}
    for c in step_collectives(units, strategy, ranks, replicas, param_bytes, grad_bytes, buffer_bytes, micro_batches):
        payloads[c.kind] = payloads.get(c.kind, 0) + c.nbytes
    return payloads


def bytes_sent(kind: str, nbytes: float, n: int) -> float:
    """Bytes each of ``n`` ranks sends for a collective handed ``nbytes`` (ring algorithms)."""
    if n <= 1:
        return 0.0
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "broadcast": 1.0}[kind] * nbytes


def group_ranks(group: str, gpus: int, replicas: int) -> tuple[int, int]:
    """(ranks, ranks in each node) of a collective's group in a run on ``gpus`` GPUs (whole nodes of
    :data:`GPUS_PER_NODE`; HSDP's shard group within a node, its replicate group one GPU in each node)."""
    if group == "replicate":
        return replicas, 1
    n = gpus // replicas if group == "shard" else gpus
    return n, min(n, GPUS_PER_NODE)


def collective_seconds(c: Collective, gpus: int, replicas: int, hw: Hardware) -> float:
    """Time of ``c`` in a run on ``gpus`` GPUs, HSDP with ``replicas``: bytes sent / bandwidth + latency."""
    n, per_node = group_ranks(c.group, gpus, replicas)
    if n <= 1:
        return 0.0
    nodes = n // per_node
    bandwidth = min(hw.nvlink_gb_s, per_node * hw.infiniband_gb_s) if nodes > 1 else hw.nvlink_gb_s
    if c.kind in ("all_gather", "reduce_scatter"):  # a ring: n - 1 steps, nodes - 1 of them between nodes
        latency_us = (n - nodes) * hw.nvlink_step_us + (nodes - 1) * hw.infiniband_step_us
    else:  # a tree: up and down (all-reduce) or down (broadcast) a chain in the node and a binary tree across
        depth = (per_node - 1) * hw.nvlink_step_us + math.ceil(math.log2(nodes)) * hw.infiniband_step_us
        latency_us = depth * (2 if c.kind == "all_reduce" else 1)
    return bytes_sent(c.kind, c.nbytes, n) / (bandwidth * 1e9) + c.calls * latency_us * 1e-6


@dataclass(frozen=True)
class ModelFacts:
    params: int  # trainable
    frozen: int  # the fixed position embeddings
    units: tuple[ShardUnit, ...]
    buffer_bytes: int
    flops_per_image: float  # training (forward + backward), matrix multiplies
    act_bytes_per_image: float  # without checkpointing
    ckpt_bytes_per_image: float  # with per-block checkpointing, the recomputed block's included


@functools.lru_cache(maxsize=None)
def model_facts(name: str) -> ModelFacts:
    """Parameters, FSDP units, FLOPs and activation bytes per image of one of :data:`MODELS`."""
    arguments = MODELS[name]
    with torch.device("meta"):
        model = MAEViT(img_size=IMG_SIZE, **arguments)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    L = model.num_patches
    K = int(L * (1 - MASK_RATIO))
    D, Dd = arguments["embed_dim"], arguments["decoder_embed_dim"]
    enc, dec = (1 + K) * D * arguments["depth"], (1 + L) * Dd * arguments["decoder_depth"]
    act = ACT_BYTES_PER_TOKEN_CHANNEL * (enc + dec)
    recompute_one = ACT_BYTES_PER_TOKEN_CHANNEL * max((1 + K) * D, (1 + L) * Dd)
    ckpt = CKPT_BYTES_PER_TOKEN_CHANNEL * (enc + dec) + recompute_one
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelFacts(params, frozen, tuple(shard_units(model)), buffers, model.flops_per_image(MASK_RATIO), act, ckpt)


def plan(name: str, gpus: int, hw: Hardware, global_batch: int = GLOBAL_BATCH) -> dict:
    """One row: per-GPU batch, memory, bytes sent, compute and communication times and efficiency per strategy.

    A GPU's share of the global batch runs in micro-batches of at most :data:`MICRO_BATCH` images (gradient
    accumulation without sync, as the engine runs it). HSDP shards within a node and replicates across nodes.
    """
    facts = model_facts(name)
    P = facts.params
    batch = global_batch / gpus
    micro = min(batch, MICRO_BATCH)
    accum = max(1, round(batch / micro))
    micro_s = facts.flops_per_image * micro / (hw.peak_tflops * 1e12 * hw.mfu)
    nodes = max(1, gpus // GPUS_PER_NODE)
    row = {"model": name, "gpus": gpus, "nodes": nodes, "batch": batch, "accum": accum, "params": P,
           "compute_ms": micro_s * accum * 1e3}
    for strategy in STRATEGIES:
        replicas = nodes if strategy == "hsdp" else 1
        shard = gpus // replicas if strategy != "ddp" else 1
        collectives = step_collectives(list(facts.units), strategy, gpus, replicas, buffer_bytes=facts.buffer_bytes,
                                       micro_batches=accum)
        seconds = {c.kind: collective_seconds(c, gpus, replicas, hw) for c in collectives}
        comm_s = sum(seconds.values())
        # fp32 weights (the frozen position embeddings too), and gradients and AdamW moments of the trainable ones
        if strategy == "ddp":
            states = 4 * facts.frozen + (16 + 4 + 2) * P  # + DDP's buckets + autocast's bf16 weight copies
        else:
            root = next(unit for unit in facts.units if unit.root)
            block = max(unit.numel(shard) for unit in facts.units if not unit.root)
            sharded = sum(4 * unit.numel(shard) + 12 * unit.numel(shard, trainable_only=True) for unit in facts.units)
            states = sharded / shard + 2 * root.numel(shard) + (2 * 2 + 2 + 4) * block
            if accum > 1:  # FSDP2's unsharded fp32 gradients, accumulated between syncs
                states += 4 * P
        row[f"{strategy}_sent_gb"] = sum(bytes_sent(c.kind, c.nbytes, group_ranks(c.group, gpus, replicas)[0])
                                         for c in collectives) / 1e9
        row[f"{strategy}_comm_ms"] = comm_s * 1e3
        for ckpt in (False, True):
            suffix = "_ckpt" if ckpt else ""
            act = (facts.ckpt_bytes_per_image if ckpt else facts.act_bytes_per_image) * micro
            row[f"{strategy}_mem_gb{suffix}"] = (states + act) / 1e9
            forward, backward = micro_s / 3, micro_s * (1 if ckpt else 2 / 3)  # checkpointing reruns the forward
            if strategy == "ddp":
                exposed = max(0.0, seconds["all_reduce"] - backward) + seconds.get("broadcast", 0.0)
            else:
                half = seconds["all_gather"] / accum / 2  # a micro-batch's gathers: half in forward, half in backward
                last = half + seconds["reduce_scatter"] + seconds.get("all_reduce", 0.0)
                exposed = (accum * max(0.0, half - forward) + (accum - 1) * max(0.0, half - backward)
                           + max(0.0, last - backward))
            compute_s = accum * (forward + backward)
            ideal_s = micro_s * accum
            row[f"{strategy}_eff{suffix}"] = ideal_s / (compute_s + exposed)
            row[f"{strategy}_eff_serial{suffix}"] = ideal_s / (compute_s + comm_s)
    row["choice"] = "none fits"
    for suffix in ("", "_ckpt"):  # without checkpointing if any strategy fits so
        fits = [s for s in STRATEGIES if row[f"{s}_mem_gb{suffix}"] <= hw.gpu_memory_gb]
        if fits:  # the most efficient; within a point, the simpler (DDP, then HSDP, then FSDP)
            best = max(fits, key=lambda s: (round(row[f"{s}_eff{suffix}"], 2), -"dhf".index(s[0])))
            row["choice"] = f"{best.upper()}{' + checkpointing' if suffix else ''} ({row[f'{best}_eff{suffix}']:.0%})"
            break
    return row


def table(name: str, hw: Hardware, global_batch: int | None) -> list[str]:
    """One model's rows: at the recipe's global batch, or (``global_batch=None``) at 64 images per GPU."""
    lines = ["| GPUs | batch/GPU (accum) | compute ms | memory GB DDP | FSDP | HSDP | sent GB DDP | FSDP | HSDP "
             "| comm ms DDP | FSDP | HSDP | efficiency DDP | FSDP | HSDP | use |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for gpus in GPU_COUNTS:
        r = plan(name, gpus, hw, global_batch or MICRO_BATCH * gpus)
        mem = " | ".join(f"{r[f'{s}_mem_gb']:.1f} / {r[f'{s}_mem_gb_ckpt']:.1f}" for s in STRATEGIES)
        sent = " | ".join(f"{r[f'{s}_sent_gb']:.2f}" for s in STRATEGIES)
        comm = " | ".join(f"{r[f'{s}_comm_ms']:.1f}" for s in STRATEGIES)
        eff = " | ".join(f"{r[f'{s}_eff']:.0%} ({r[f'{s}_eff_serial']:.0%})" for s in STRATEGIES)
        lines.append(f"| {gpus:,} | {r['batch']:g} ({r['accum']}) | {r['compute_ms']:.1f} | {mem} | {sent} | {comm} "
                     f"| {eff} | {r['choice']} |")
    return lines


def summary(hw: Hardware) -> list[str]:
    """The key rows, one table for every model: at the recipe's 64 images per GPU on 64 GPUs, at its global batch on
    256 GPUs (16 images per GPU), and at 64 images per GPU on 1,024 GPUs."""
    lines = ["| model | GPUs | batch/GPU | memory GB DDP | FSDP | HSDP | efficiency DDP | FSDP | HSDP | use |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in MODELS:
        for gpus, global_batch in ((64, GLOBAL_BATCH), (256, GLOBAL_BATCH), (1024, MICRO_BATCH * 1024)):
            r = plan(name, gpus, hw, global_batch)
            mem = " | ".join(f"{r[f'{s}_mem_gb']:.1f}" for s in STRATEGIES)
            eff = " | ".join(f"{r[f'{s}_eff']:.0%}" for s in STRATEGIES)
            lines.append(f"| {name} | {gpus:,} | {r['batch']:g} | {mem} | {eff} | {r['choice']} |")
    return lines


def assumptions(hw: Hardware) -> str:
    return (f"Assumptions: {IMG_SIZE} px, mask ratio {MASK_RATIO}; micro-batches of at most {MICRO_BATCH} images per "
            f"GPU (more are accumulated, without sync); {GPUS_PER_NODE} GPUs per node with {hw.gpu_memory_gb:g} GB "
            f"each; per GPU and direction NVLink {hw.nvlink_gb_s:g} GB/s and InfiniBand {hw.infiniband_gb_s:g} GB/s "
            f"(its own adapter), {hw.nvlink_step_us:g} µs and {hw.infiniband_step_us:g} µs per step of a collective "
            f"within a node and between nodes; ring all-gathers and reduce-scatters, tree all-reduces; dense bf16 peak "
            f"{hw.peak_tflops:g} TFLOP/s at {hw.mfu:.0%} MFU; bf16 autocast, fp32 master weights, gradients and "
            "AdamW moments; FSDP gathers bf16 and reduces fp32; HSDP shards within a node, replicates across. Memory "
            "per GPU without / with per-block activation checkpointing (which recomputes the forward: 4/3 of the "
            "compute), no allocator slack; sent: bytes each GPU sends per optimizer step; comm: those bytes' time "
            "plus latency; efficiency: the step's compute over its compute and the communication it cannot hide, "
            "in brackets with none hidden. 'use': the most efficient strategy that fits without checkpointing, "
            "else with it (a point's difference goes to the simpler), with its efficiency.")


def markdown(hw: Hardware, command: str = "python bench/scaling.py") -> str:
    """The whole plan: the command that made it, the assumptions, then per model a table at the recipe's batch and
    one at 64 images per GPU."""
    lines = ["# MAE pretraining past one node: a plan on paper", "",
             f"Made by `{command}`. Computed, not measured: no figure here comes from a GPU.", "", assumptions(hw), "",
             "The key rows (memory without activation checkpointing, efficiency with communication hidden where it "
             "can be):", "", *summary(hw), ""]
    for name in MODELS:
        facts = model_facts(name)
        lines += [f"## {name}: {facts.params / 1e6:,.0f} M parameters (encoder and decoder), "
                  f"{facts.flops_per_image / 1e9:,.0f} GFLOP per training image", "",
                  f"At the recipe's global batch, {GLOBAL_BATCH:,} (strong scaling):", ""]
        lines += table(name, hw, GLOBAL_BATCH)
        lines += ["", f"At {MICRO_BATCH} images per GPU, the global batch growing with the GPUs (weak scaling; "
                      "the lr follows by the linear rule):", ""]
        lines += table(name, hw, None)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    defaults = Hardware()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=defaults.mfu,
                        help="model FLOP utilization assumed (default: %(default)s)")
    parser.add_argument("--gpu_memory_gb", type=float, default=defaults.gpu_memory_gb,
                        help="memory per GPU, for the choice of strategy (default: %(default)s, an H100)")
    parser.add_argument("--nvlink_gb_s", type=float, default=defaults.nvlink_gb_s,
                        help="NVLink bandwidth per GPU and direction (default: %(default)s)")
    parser.add_argument("--infiniband_gb_s", type=float, default=defaults.infiniband_gb_s,
                        help="InfiniBand bandwidth per GPU and direction (default: %(default)s, 400 Gb/s NDR)")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu must be in (0, 1], got {args.mfu}")
    for flag in ("gpu_memory_gb", "nvlink_gb_s", "infiniband_gb_s"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    command = " ".join(["python bench/scaling.py", *(sys.argv[1:] if argv is None else argv)])
    print(markdown(Hardware(mfu=args.mfu, gpu_memory_gb=args.gpu_memory_gb, nvlink_gb_s=args.nvlink_gb_s,
                            infiniband_gb_s=args.infiniband_gb_s), command))


if __name__ == "__main__":
    main()
