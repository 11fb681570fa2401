"""bench/scaling.py against what runs: the bytes each rank hands to each kind of collective in a training step under
DDP, FSDP2 and HSDP on 2 and 4 gloo processes, and the activation bytes a block keeps for its backward."""

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

from mae_fast.model import MAEViT
from mae_fast.trainer import MAETrainer

SCALING = Path(__file__).resolve().parents[1] / "bench" / "scaling.py"
# MLP widths (54, 30) that are not multiples of 4, and position embeddings and tokens of first dimension 1:
# FSDP2's padding shows at 2 and at 4 ranks.
TINY = dict(img_size=32, patch_size=8, embed_dim=36, depth=2, num_heads=3, decoder_embed_dim=20, decoder_depth=1,
            decoder_num_heads=2, mlp_ratio=1.5, kernel_backend="torch")
GPU_POLICY = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # the engine's under bf16 autocast


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCALING)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    return sum(_nbytes(a) for a in arg) if isinstance(arg, (list, tuple)) else 0


class _CollectiveBytes(TorchDispatchMode):
    """Bytes handed to each kind of c10d collective while active: an all-gather's output, a reduce-scatter's
    input, an all-reduce's or broadcast's tensors. Any other c10d op is recorded under its own name."""

    def __init__(self):
        super().__init__()
        self.payloads: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func.__name__.split(".")[0]
            kind, arg = next(((kind, arg) for key, kind, arg in (("allgather", "all_gather", 0),
                                                                   ("reduce_scatter", "reduce_scatter", 1),
                                                                   ("allreduce", "all_reduce", 0),
                                                                   ("broadcast", "broadcast", 0)) if key in name),
                             (name, None))
            self.payloads[kind] = self.payloads.get(kind, 0) + (_nbytes(args[arg]) if arg is not None else 0)
        return func(*args, **(kwargs or {}))


def _wrapped(strategy: str, world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to call, the model) as the engine wraps it: DDP, or FSDP2 per block then the whole model."""
    torch.manual_seed(0)
    model = MAEViT(**TINY)
    if strategy == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), model
    policy = MixedPrecisionPolicy(**GPU_POLICY) if strategy.endswith("bf16") else MixedPrecisionPolicy()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) \
        if strategy.startswith("hsdp") else None
    for block in MAETrainer.shard_units(None, model):  # the method reads nothing from the trainer
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy), model


def _measure(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for strategy in ("ddp", "fsdp", "fsdp-bf16") + (("hsdp-bf16",) if world == 4 else ()):
            module, model = _wrapped(strategy, world)
            images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
            # The third step is measured: FSDP2 sets up in the first, DDP rebuilds its buckets in the second.
            # The optimizer's update is left out: it is local to each rank (and DTensor's first one costs seconds).
            for step in range(3):
                recorder = _CollectiveBytes()
                with recorder:
                    loss, _, _ = module(images, mask_ratio=0.75, return_pred=False)
                    loss.backward()
                model.zero_grad(set_to_none=True)
            results[strategy] = recorder.payloads
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_each_rank_hands_the_collectives_the_bytes_the_plan_counts(scaling, tmp_path):
    model = MAEViT(**TINY)
    units = scaling.shard_units(model)
    # The plan's units are the ones pretraining wraps, and hold every parameter once.
    assert [u.shapes for u in units if not u.root] == [
        tuple(tuple(p.shape) for p in block.parameters()) for block in MAETrainer.shard_units(None, model)]
    assert sum(u.numel() for u in units) == sum(p.numel() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    # fork: the children start with torch and mae_fast imported, where spawned ones would import them again
    # (seconds each); spawn only if this process holds a process group, which a forked child could not use.
    start_method = "spawn" if dist.is_initialized() else "fork"
    for world in (2, 4):
        mp.start_processes(_measure, args=(world, _free_port(), str(tmp_path / f"w{world}")), nprocs=world,
                           start_method=start_method)
        expected = {
            "ddp": scaling.collective_payloads(units, "ddp", world, grad_bytes=4, buffer_bytes=buffer_bytes),
            "fsdp": scaling.collective_payloads(units, "fsdp", world, param_bytes=4, grad_bytes=4),
            "fsdp-bf16": scaling.collective_payloads(units, "fsdp", world, param_bytes=2, grad_bytes=4)}
        if world == 4:
            expected["hsdp-bf16"] = scaling.collective_payloads(units, "hsdp", world, replicas=2, param_bytes=2,
                                                                grad_bytes=4)
        for rank in range(world):
            assert torch.load(f"{tmp_path / f'w{world}'}.{rank}") == expected, (world, rank)


def test_the_padding_and_the_ring_bytes(scaling):
    unit = scaling.ShardUnit(((1, 5, 3), (7, 2), (4,)), (False, True, True))
    assert unit.numel() == 15 + 14 + 4
    assert unit.numel(4) == 4 * 15 + 8 * 2 + 4 and unit.numel(4, trainable_only=True) == 8 * 2 + 4
    assert scaling.bytes_sent("all_reduce", 100, 4) == 150 and scaling.bytes_sent("all_gather", 100, 4) == 75
    assert scaling.bytes_sent("reduce_scatter", 100, 1) == 0
    with pytest.raises(ValueError, match="replicas"):
        scaling.step_collectives([unit], "hsdp", 4, replicas=3)


def _saved_bytes_per_token_channel(model: MAEViT, tokens: int) -> float:
    """Bytes the model's blocks keep for the backward per token and channel under bf16 autocast: the difference
    between two batch sizes, so that what does not grow with the batch (the weights' bf16 copies) drops out."""
    dim = model.blocks[0].norm1.normalized_shape[0]

    def saved(batch: int) -> int:
        storages = {}

        def pack(t):
            storages[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(batch, tokens, dim, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model._run_blocks(model.blocks, x)
        return sum(storages.values())

    return (saved(4) - saved(2)) / (2 * tokens * dim * len(model.blocks))


def test_a_block_keeps_the_activation_bytes_the_plan_counts(scaling):
    model = MAEViT(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=4, decoder_embed_dim=32,
                   decoder_depth=1, decoder_num_heads=2, kernel_backend="torch")
    # Beyond the counted bytes: the LayerNorms' statistics and the attention's log-sum-exp, a few bytes per token.
    assert abs(_saved_bytes_per_token_channel(model, tokens=20) - scaling.ACT_BYTES_PER_TOKEN_CHANNEL) < 0.5
    model.grad_checkpointing = True
    assert _saved_bytes_per_token_channel(model, tokens=20) == scaling.CKPT_BYTES_PER_TOKEN_CHANNEL


def test_the_committed_plan_and_the_readme_s_rows_are_what_the_script_prints(scaling):
    printed = scaling.markdown(scaling.Hardware())
    assert (SCALING.parent / "results" / "scaling.md").read_text() == printed + "\n"
    readme = (SCALING.parents[1] / "README.md").read_text().split("### Scaling past one node", 1)[1]
    assert "\n".join(scaling.summary(scaling.Hardware())) in readme
