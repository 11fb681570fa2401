"""Two processes under torchrun (gloo): ranks stay identical and match one process with the same global batch."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_fast.pretrain import config_from_args
from mae_fast.trainer import MAETrainer
from helpers import tiny_args, write_images

HERE = Path(__file__).parent


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("accum", ["1", "2"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, accum):
    data = write_images(tmp_path / "data", 20)
    result = tmp_path / "two_ranks.pth"
    # 20 images, 2 ranks x 3 per rank: 4 batches an epoch, the last one padded; accumulation skips the
    # all-reduce on the batches that do not step (no_sync) and must still match one rank.
    run = torchrun(str(HERE / "dist_worker.py"), str(result),
                   *tiny_args(data, tmp_path / "two", "--batch_size", "3", "--accum_iter", accum))
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(result, weights_only=True)
    one = MAETrainer(config_from_args(tiny_args(data, tmp_path / "one", "--batch_size", "6", "--accum_iter", accum)))
    one.fit()
    assert [s for s, _ in two["history"]] == [s for s, _ in one.history]
    assert [v for _, v in two["history"]] == pytest.approx([v for _, v in one.history], rel=1e-4)
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_torchrun_runs_the_pretrain_module(tmp_path):
    data = write_images(tmp_path / "data", 8)
    out = tmp_path / "out"
    run = torchrun("-m", "mae_fast.pretrain", *tiny_args(data, out, "--epochs", "1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "checkpoint-0.pth").is_file() and len((out / "log.txt").read_text().splitlines()) == 1
    assert "x2" in run.stderr + run.stdout  # the start-up summary names the world size


def test_compile_under_ddp(tmp_path):
    # torch.compile(DDP(model), fullgraph=True) cannot trace DDP's forward: the trainer leaves the split to DDP.
    data = write_images(tmp_path / "data", 8)
    run = torchrun(str(HERE / "aot_eager_worker.py"), *tiny_args(data, tmp_path / "out", "--batch_size", "2",
                                                                 "--max_steps", "3", "--compile"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 3/3" in run.stdout


def test_a_restarted_rank_that_starts_late_still_joins(tmp_path):
    # torchrun keeps one store for all restarts: without mae_fast's prefix, rank 0 of the restart read the dead rank
    # 1's address there and failed to connect ("Connection refused"), as the elastic restart test did once in CI.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--max_restarts=1", "--monitor_interval=0.1", str(HERE / "restart_worker.py"), "8"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(re.findall(r"rank \d joined in restart \d", run.stdout)) == [  # the ranks' lines may interleave
        "rank 0 joined in restart 0", "rank 0 joined in restart 1", "rank 1 joined in restart 0",
        "rank 1 joined in restart 1"]


def test_restarts_across_nodes_without_fresh_stores_are_warned_about(monkeypatch, caplog):
    import datetime
    import logging

    from mae_fast.distributed import FRESH_STORE_ENV, restart_safe_store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # two nodes: each agent counts its own restarts
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        assert restart_safe_store(0, 16, datetime.timedelta(seconds=1)) is None  # torchrun's store, as it is
    assert f"set {FRESH_STORE_ENV}=1 where torchrun starts" in caplog.text
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        assert restart_safe_store(0, 16, datetime.timedelta(seconds=1)) is None
    assert caplog.text == ""  # no restarts, nothing to warn about
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # torchrun made a fresh store for this restart
    assert restart_safe_store(0, 16, datetime.timedelta(seconds=1)) is None
