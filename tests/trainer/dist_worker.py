"""Run by test_distributed.py under torchrun: train, check that every rank holds the same weights, save them."""

import sys

import torch
import torch.distributed as dist

from mae_fast.distributed import teardown_distributed
from mae_fast.pretrain import config_from_args
from mae_fast.trainer import MAETrainer

if __name__ == "__main__":
    result_path, args = sys.argv[1], sys.argv[2:]
    trainer = MAETrainer(config_from_args(args))
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise SystemExit("parameters differ between ranks")
    if trainer.dist.is_main:
        torch.save({"model": trainer.model.state_dict(), "history": trainer.history}, result_path)
    teardown_distributed()
