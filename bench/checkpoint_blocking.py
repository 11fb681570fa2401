"""How long a checkpoint save blocks the training loop: full (gathered to rank 0) vs DCP vs DCP in the background.

    python bench/checkpoint_blocking.py                        # ViT-B/16 MAE, 2 and 4 gloo ranks on the CPU
    python bench/checkpoint_blocking.py --ranks 2 --model mae_vit_tiny_patch16 --repeats 1   # a quick look

Each rank runs mae_fast's own engine (``MAETrainer`` under FSDP2, synthetic data, one optimizer step so that AdamW's
moments exist), then saves ``checkpoint-last`` ``--repeats`` times in each format, as the training loop does
(``Engine.save``), and records per save:

- ``blocked``: the wall time the loop waits in ``save()`` (slowest rank); for ``--async_save`` that is the staging
  copy into CPU memory, after which training goes on;
- ``written``: until the checkpoint is complete on disk and renamed into place (for the background save, ``save()``
  followed by ``wait_for_saves()``).

It prints a Markdown table (median over the repeats) with the machine's CPU count and load. A benchmark, not a test:
the figures depend on the disk, the CPU and what else runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_fast.checkpoint import LAST  # noqa: E402

MODES = {"full": ("--checkpoint_format", "full"), "dcp": ("--checkpoint_format", "dcp"),
         "dcp async": ("--checkpoint_format", "dcp", "--async_save")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, model: str, repeats: int, folder: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mae_fast.pretrain import config_from_args
    from mae_fast.trainer import MAETrainer

    for mode, flags in MODES.items():
        out = Path(folder) / f"{world}-{mode.replace(' ', '-')}"
        args = ["--data_backend", "synthetic", "--synthetic_samples", str(world), "--model", model, "--batch_size",
                "1", "--input_size", "224", "--device", "cpu", "--fsdp", "--epochs", "1", "--max_steps", "1",
                "--warmup_epochs", "0", "--save_last_every", "0", "--log_every", "1", "--output_dir", str(out),
                "--num_workers", "0", *flags]
        trainer = MAETrainer(config_from_args(args))
        trainer.fit()  # one step (AdamW's state exists), and one save of its own
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            trainer.save(LAST)
            blocked = time.perf_counter() - start
            trainer.wait_for_saves()
            written = time.perf_counter() - start
            times = torch.tensor([blocked, written], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            if rank == 0:
                results.append((world, mode, float(times[0]), float(times[1])))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(out)  # a ViT-B/16 checkpoint with AdamW's moments is 1.3 GB: one mode's at a time
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    manager = mp.Manager()
    results = manager.list()
    with tempfile.TemporaryDirectory(prefix="mae_fast-ckpt-bench-") as folder:
        for world in args.ranks:
            mp.spawn(_rank, args=(world, _free_port(), args.model, args.repeats, folder, results), nprocs=world)
    rows: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for world, mode, blocked, written in results:
        rows.setdefault((world, mode), []).append((blocked, written))
    load = os.getloadavg()[0]
    print(f"{args.model}, FSDP2 over gloo on the CPU ({os.cpu_count()} cores, load {load:.1f} at the end), the "
          f"checkpoint in {tempfile.gettempdir()}; median of {args.repeats} saves\n")
    print("| ranks | format | loop blocked (s) | until written (s) |")
    print("|---|---|---|---|")
    for (world, mode), times in sorted(rows.items(), key=lambda item: (item[0][0], list(MODES).index(item[0][1]))):
        print(f"| {world} | {mode} | {statistics.median(t[0] for t in times):.2f} | "
              f"{statistics.median(t[1] for t in times):.2f} |")


if __name__ == "__main__":
    main()
