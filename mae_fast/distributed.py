"""Process-group setup from torchrun's environment (one GPU per process; gloo on CPUs).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous for one node, many nodes, or
SLURM allocations (``srun torchrun ...``); plain ``python -m`` runs as a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mae_fast.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process stands."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", timeout_s: float = 900.0) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs) and pick the device.

    Args:
        device: "auto" (CUDA when available), "cuda" or "cpu".
        timeout_s: how long a collective may wait for the other ranks (``--dist_timeout``). Past it, gloo
            raises in the waiting rank (see :func:`is_collective_timeout`) and NCCL's watchdog ends the
            process with a message naming the timeout; either way torchrun then stops the job.

    Raises:
        ConfigError: ``device="cuda"`` on a machine without a usable GPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: no CUDA GPU is available on this machine, got 'cuda'; use --device cpu or auto")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = restart_safe_store(rank, world_size, timeout)
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo",
                                device_id=dev if device == "cuda" else None, timeout=timeout,
                                **({"store": store, "rank": rank, "world_size": world_size} if store else {}))
    return DistInfo(rank, world_size, local_rank, dev)


#: Set to 1 in torchrun's environment, it gives every restart of the workers a store of its own (torch's workaround
#: for the shared store's stale keys, pytorch/pytorch#135712).
FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """The store this rank joins the process group through: None for torchrun's own (``env://``), or that store with
    the keys of each restart apart.

    torchrun (torch 2.5 and later) keeps one store for all the restarts of its workers (``TORCHELASTIC_USE_AGENT_STORE``)
    and the process group writes the same keys in each (every rank's gloo address, NCCL's id). A restarted rank that
    joins before another has started can then read the address of that rank's dead predecessor and fail to connect
    (pytorch/pytorch#135712; seen here with ``--max_restarts`` when a restarted rank starts late). On one node, one
    agent counts the restarts of every rank, so each restart's keys go under a prefix naming it. Across nodes each
    agent counts its own restarts (a node whose workers were healthy does not count), so a prefix could split the
    ranks: there the fix is torch's, :data:`FRESH_STORE_ENV` ``=1`` in torchrun's environment, and rank 0 warns when
    restarts are allowed without it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # torchrun gives each restart a new store (or no torchrun)
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            logging.getLogger("mae_fast").warning(
                "torchrun --max_restarts shares one store across restarts; a restarted rank can read a dead one's "
                "address and fail to connect (pytorch/pytorch#135712): set %s=1 where torchrun starts, on every node",
                FRESH_STORE_ENV)
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    return dist.PrefixStore(f"mae_fast/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown_distributed(finished: bool = False) -> None:
    """Leave the process group if one was joined.

    ``finished``: every rank got here the same way (a run that ended normally), so they first wait
    for each other; a rank tearing down its connections while another still closes its own can
    abort that one at exit (seen with gloo). Never on an error path, where a rank may be gone.
    """
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that gave up waiting for another rank (gloo's or NCCL's timeout)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text and "watchdog" in text)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks (a no-op on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
