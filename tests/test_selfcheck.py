"""The self-test (``python -m mae_fast.info --check``) and the trainer's verify-before-trust probe.

Each is shown to catch a deliberately wrong backend, injected in the op registry that ``auto`` and
explicit backends both read, and to pass the real ones.
"""

import subprocess
import sys

import pytest
import torch

from mae_fast import selfcheck
from mae_fast.ops import IMPLEMENTATIONS, dispatch

INTERPRETED = dispatch._why_not("triton", [torch.zeros(1)]) is None
needs_triton = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                  reason="Triton can run neither interpreted nor on a GPU here")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def off_by_a_percent(implementation):
    """A backend whose output is 1 % off the right one (its gradients stay right)."""
    def wrong(*args, **kwargs):
        return implementation(*args, **kwargs) * 1.01
    return wrong


def test_compare_follows_the_reference_rule():
    hi = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lo = torch.tensor([1.0, 2.001])
    assert selfcheck.compare(torch.tensor([1.0, 2.002]), hi, lo, floor=0.0) == pytest.approx((0.002, 0.002), rel=1e-3)
    assert selfcheck.compare(torch.tensor([1.0, float("nan")]), hi, lo)[0] == float("inf")
    assert selfcheck.compare(torch.zeros(3), hi, lo)[0] == float("inf")  # a wrong shape


@needs_triton
@pytest.mark.parametrize("case", selfcheck.OP_CASES, ids=lambda c: c.name)
def test_every_op_case_passes_on_triton_and_fails_when_wrong(case, monkeypatch):
    right = selfcheck.check_op(case, "triton", selfcheck.PROBE_SHAPE, DEVICE, torch.float32)
    assert right.ok, right
    assert right.max_error <= right.tolerance
    monkeypatch.setitem(IMPLEMENTATIONS[case.op], "triton", off_by_a_percent(IMPLEMENTATIONS[case.op]["triton"]))
    wrong = selfcheck.check_op(case, "triton", selfcheck.PROBE_SHAPE, DEVICE, torch.float32)
    assert wrong.ok is False and wrong.max_error > wrong.tolerance, wrong


def test_a_backend_that_raises_fails_its_check(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access")
    case = next(c for c in selfcheck.OP_CASES if c.op == "restore_tokens")
    monkeypatch.setitem(IMPLEMENTATIONS["restore_tokens"], "triton", broken)
    result = selfcheck.check_op(case, "triton", selfcheck.PROBE_SHAPE, DEVICE, torch.float32)
    assert result.ok is False and result.note == "RuntimeError: illegal memory access"
    assert result.outcome == "FAIL" and "| FAIL |" in selfcheck.format_row(result)


@needs_triton
def test_verification_passes_over_a_wrong_backend_and_keeps_the_right_ones(monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS["masked_patch_loss"], "triton",
                        off_by_a_percent(IMPLEMENTATIONS["masked_patch_loss"]["triton"]))
    warnings = []
    chosen = selfcheck.verify_kernel_backends(DEVICE, torch.float32, "triton", warn=warnings.append)
    assert chosen["masked_patch_loss"] == "torch"
    assert {op: b for op, b in chosen.items() if op != "masked_patch_loss"} == \
        {op: "triton" for op in IMPLEMENTATIONS if op != "masked_patch_loss"}
    (line,) = warnings
    assert line.startswith("masked_patch_loss on the triton backend does not match its reference on this machine "
                           "(max error ")
    assert line.endswith("); using the next backend instead")


def test_verification_keeps_an_explicit_backend_that_cannot_run_so_it_says_why():
    if torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    chosen = selfcheck.verify_kernel_backends(torch.device("cpu"), torch.float32, "cuda")
    # add_pos_embed has no CUDA kernel: it starts at the next backend (Triton) instead of refusing the run.
    assert chosen == {op: ("triton" if op == "add_pos_embed" else "cuda") for op in IMPLEMENTATIONS}
    assert selfcheck.verify_kernel_backends(torch.device("cpu"), torch.float32, "auto") == \
        {op: "torch" for op in IMPLEMENTATIONS}  # auto runs kernels on CUDA tensors only


def test_info_check_prints_a_row_per_check_and_says_what_it_skipped():
    done = subprocess.run([sys.executable, "-m", "mae_fast.info", "--check", "--quick"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert selfcheck.TABLE_HEADER.splitlines()[0] in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| check")]
    assert any(r.startswith("| attention[sdpa] | sdpa | float32 |") and "| OK |" in r for r in rows)
    if not torch.cuda.is_available():
        cuda_rows = [r for r in rows if "| cuda |" in r]
        assert cuda_rows and all("| SKIP |" in r and "needs CUDA tensors" in r for r in cuda_rows)
    assert lines[-1].endswith(" s") and " FAIL" in lines[-1] and "0 FAIL" in lines[-1]


def test_info_check_exits_1_when_a_check_fails(monkeypatch, capsys):
    import mae_fast.attention as attention
    from mae_fast import info

    def wrong_sdpa(q, k, v, **kwargs):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v * 1.01, **kwargs)

    monkeypatch.setattr(attention, "F", type("F", (), {"scaled_dot_product_attention": staticmethod(wrong_sdpa)}))
    monkeypatch.setattr(selfcheck, "check_decoding", lambda device: selfcheck.CheckResult(
        "DALI decode", "cpu", "uint8", None, None, None, 0.0, "left out of this test"))
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--check", "--quick"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "| attention[sdpa] | sdpa | float32 |" in out and "| FAIL |" in out
