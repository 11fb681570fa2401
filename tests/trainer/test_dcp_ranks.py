"""DCP checkpoints across numbers of ranks (gloo, torchrun): a checkpoint written by N ranks resumes on M and trains as
one rank does with the same global batch (1 -> 2 -> 1, and 4 ranks of HSDP -> 2), and torchrun's restarts bring back a
run one of whose ranks died."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mae_fast.checkpoint import load_file, read_summary
from mae_fast.pretrain import config_from_args
from mae_fast.trainer import MAETrainer
from helpers import tiny_args, write_images


def torchrun(ranks: int, *args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            f"--max_restarts={restarts}", "--monitor_interval=0.1", "-m", "mae_fast.pretrain", *args]


def run_ranks(ranks: int, *args: str) -> str:
    done = subprocess.run(torchrun(ranks, *args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name, value in a.items():
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_checkpoint_of_n_ranks_resumes_on_m_ranks_as_one_rank_trains(tmp_path):
    data = write_images(tmp_path / "data", 16)
    # 16 images, a global batch of 4 (1 x 4, 2 x 2, 4 x 1): 4 steps an epoch, 8 in all. The reference: one rank,
    # never interrupted, keeping every epoch's checkpoint.
    reference = MAETrainer(config_from_args(tiny_args(data, tmp_path / "one", "--save_every", "1")))
    reference.fit()
    at_4 = load_file(tmp_path / "one" / "checkpoint-0.pth")["model"]

    # DCP, 1 -> 2 -> 1 ranks, stopping mid-epoch each time.
    out = tmp_path / "chain"
    MAETrainer(config_from_args(tiny_args(data, out, "--fsdp", "--max_steps", "2"))).fit()
    assert (out / "checkpoint-last.dcp").is_dir()  # --fsdp writes DCP by default
    log = run_ranks(2, *tiny_args(data, out, "--fsdp", "--batch_size", "2", "--resume", "auto", "--max_steps", "6"))
    assert "at step 2 (epoch 1/2, batch 2/4)" in log  # 8 images done: 2 of this run's global batches of 4
    assert sorted(os.listdir(out / "checkpoint-last.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                "mae_fast.pt"]
    last = MAETrainer(config_from_args(tiny_args(data, out, "--fsdp", "--resume", "auto")))
    assert last.step == 6
    last.fit()
    close(load_file(out / "checkpoint-last.dcp")["model"], reference.model.state_dict())
    assert [s for s, _ in last.history] == [7, 8]
    assert [v for _, v in last.history] == pytest.approx([v for _, v in reference.history[-2:]], rel=1e-4)

    # DCP, 4 ranks of HSDP (2 replicas x 2 shards) -> 2 ranks of FSDP, which write a full checkpoint (gathered to
    # rank 0, official keys) -> 1 rank resumes from that.
    out = tmp_path / "hsdp"
    run_ranks(4, *tiny_args(data, out, "--fsdp", "--fsdp_replicate", "2", "--batch_size", "1", "--max_steps", "3"))
    assert read_summary(out / "checkpoint-last.dcp")["step"] == 3
    assert sorted(os.listdir(out / "checkpoint-last.dcp")) == [".metadata", *(f"__{r}_0.distcp" for r in range(4)),
                                                                "mae_fast.pt"]
    run_ranks(2, *tiny_args(data, out, "--fsdp", "--batch_size", "2", "--resume", "auto", "--max_steps", "4",
                            "--checkpoint_format", "full"))
    close(load_file(out / "checkpoint-last.pth")["model"], at_4)
    last = MAETrainer(config_from_args(tiny_args(data, out, "--fsdp", "--checkpoint_format", "full", "--resume",
                                                 "auto")))
    assert last.step == 4 and last.last_saved == out / "checkpoint-last.pth"
    last.fit()
    close(load_file(out / "checkpoint-last.pth")["model"], reference.model.state_dict())


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc (Linux)")
def test_torchrun_restarts_a_run_whose_rank_died_and_it_ends_as_an_uninterrupted_resume_does(tmp_path):
    data = write_images(tmp_path / "data", 16)
    out = tmp_path / "out"
    flags = ("--fsdp", "--batch_size", "2", "--epochs", "4", "--save_every", "1", "--save_last_every", "0")
    job = subprocess.Popen(torchrun(2, *tiny_args(data, out, *flags, "--resume", "auto"), restarts=1),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-0.dcp").is_dir() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(job.pid)
        assert len(workers) == 2, "the run ended before a rank could be killed"
        os.kill(workers[1], signal.SIGKILL)  # one rank dies in the middle of the second epoch
        log, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, log[-3000:]
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, log[-3000:]
    epoch = int(resumed[0].split("(epoch ")[1].split("/")[0])  # "(epoch 1/4 done)": checkpoint-0 is the same state
    assert resumed[0].endswith(f"(epoch {epoch}/4 done)")
    same = out / f"checkpoint-{epoch - 1}.dcp"
    run_ranks(2, *tiny_args(data, tmp_path / "again", *flags, "--resume", str(same)))
    restarted, again = load_file(out / "checkpoint-last.dcp"), load_file(tmp_path / "again" / "checkpoint-last.dcp")
    assert restarted["step"] == again["step"] == 16
    for name, value in again["model"].items():
        assert torch.equal(restarted["model"][name], value), name
