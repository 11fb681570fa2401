"""The trainer verifies each fused op's backend on a small probe before it trusts it (mae_fast.selfcheck)."""

import logging

import pytest
import torch

from helpers import tiny_args, write_images
from mae_fast.ops import IMPLEMENTATIONS, dispatch
from mae_fast.pretrain import main


@pytest.mark.skipif(dispatch._why_not("triton", [torch.zeros(1)]) is not None and not torch.cuda.is_available(),
                    reason="Triton can run neither interpreted nor on a GPU here")
def test_the_trainer_warns_and_runs_on_the_next_backend(tmp_path, monkeypatch, caplog):
    right = IMPLEMENTATIONS["restore_tokens"]["triton"]
    monkeypatch.setitem(IMPLEMENTATIONS["restore_tokens"], "triton", lambda *a, **k: right(*a, **k) * 1.01)
    data = write_images(tmp_path / "data", 4)
    with caplog.at_level(logging.INFO, logger="mae_fast"):
        assert main(tiny_args(data, tmp_path / "out", "--kernel_backend", "triton", "--max_steps", "1",
                              "--epochs", "1")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(w.startswith("restore_tokens on the triton backend does not match its reference") for w in warnings) == 1
    described = next(r.getMessage() for r in caplog.records if "kernels: " in r.getMessage())
    assert "restore_tokens=torch" in described and "masked_patch_loss=triton" in described
