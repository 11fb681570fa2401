"""Checkpoints keep every rank's generator states: drop path and mixup draw per rank, so a resumed run must give each
rank its own streams back, not rank 0's."""

import os
import socket
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mae_fast.engine import Engine, rng_state_for_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)
        run = types.SimpleNamespace(dist=types.SimpleNamespace(distributed=True, world_size=2, rank=rank),
                                    device=torch.device("cpu"), task_rng_state=lambda: {"task": torch.tensor([rank])})
        states = Engine._rng_states(run)
        torch.save({"states": states, "own": torch.get_rng_state()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_s_generator_states_are_gathered_in_rank_order(tmp_path):
    mp.spawn(_gather, args=(_free_port(), str(tmp_path / "rng")), nprocs=2)
    results = [torch.load(f"{tmp_path / 'rng'}.{rank}", weights_only=True) for rank in (0, 1)]
    for rank, result in enumerate(results):
        states = result["states"]
        assert len(states) == 2
        for r in (0, 1):  # every rank holds both ranks' states, each its own rank's
            assert torch.equal(states[r]["torch"], results[r]["own"]) and states[r]["task"].item() == r
    assert not torch.equal(results[0]["own"], results[1]["own"])


def test_a_resume_gives_each_rank_its_own_states_and_rank_0_s_to_another_world_size():
    state = {"rng": {"torch": "r0"}, "rng_ranks": [{"torch": "r0"}, {"torch": "r1"}]}
    assert [rng_state_for_rank(state, r, 2)["torch"] for r in (0, 1)] == ["r0", "r1"]
    assert [rng_state_for_rank(state, r, 4)["torch"] for r in (0, 3)] == ["r0", "r0"]
    assert rng_state_for_rank({"rng": {"torch": "r0"}}, 1, 2) == {"torch": "r0"}  # a one-rank checkpoint
