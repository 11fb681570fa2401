"""A worker under ``torchrun --max_restarts 1``: rank 1 dies after joining; in the restart it starts late, so rank 0
looks for it before it has written its address (where the shared store still holds its dead predecessor's)."""

import os
import sys
import time

import torch.distributed as dist

from mae_fast.distributed import setup_distributed

rank, restart = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if restart == 1 and rank == 1:
    time.sleep(float(sys.argv[1]))
setup_distributed("cpu", timeout_s=120)
dist.barrier()
print(f"rank {rank} joined in restart {restart}", flush=True)
if restart == 0:
    if rank == 1:
        os._exit(1)
    time.sleep(120)  # torchrun stops it when rank 1 dies
dist.barrier()
dist.destroy_process_group()
