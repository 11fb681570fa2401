"""bench/gpu_check.sh runs end to end: its dry run on the CPU, from a copy of the checkout that is not installed.

The GPU check gets one try on a lent GPU; these runs prove beforehand that every phase's command
works (pytest selections collect something, the self-test and the trainer run), that the fallback
import (the editable install failed) imports a whole package, and that a phase cut at its limit
or left out is reported as such, with a failing exit status.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
PHASES = ["selfcheck", "ops_tests", "op_bench", "step_bench", "finetune_bench", "trainer", "tests", "data_bench"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the GPU check is a bash script using timeout(1)")


def run_check(cwd: Path, results: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHON=sys.executable, CHECK_DRY="1", RESULTS_DIR=str(results), **env_vars)
    return subprocess.run(["bash", "bench/gpu_check.sh"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def phase_outcomes(results: Path) -> dict[str, str]:
    rows = (results / "phases.md").read_text().splitlines()[2:]
    return {cells[1].strip(): cells[2].strip() for cells in (row.split("|") for row in rows)}


def checkout_copy(dest: Path) -> Path:
    """The tracked files of the checkout (and those not yet committed), without build outputs or the venv."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_dry_run_passes_end_to_end_with_the_fallback_import(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to copy")
    copy = checkout_copy(tmp_path / "checkout")
    results = tmp_path / "results"
    done = run_check(copy, results, CHECK_FORCE_FALLBACK="1")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # The package every phase imported is the copy, whole: mae_fast.kernels came through the link made for it.
    environment = (results / "environment.txt").read_text()
    assert f"mae_fast from {copy / 'mae_fast' / '__init__.py'}" in environment
    assert not (copy / "mae_fast" / "kernels").exists()  # the link is removed at exit
    assert phase_outcomes(results) == {name: "finished" for name in PHASES}
    summary = (results / "summary.md").read_text()
    assert "## Self-test (python -m mae_fast.info --check --quick)" in summary and "| attention[sdpa] |" in summary
    assert "NOT MEASURED (phase op_bench)" in summary  # a dry run measures nothing, and says so
    assert done.stdout.splitlines()[-1].endswith("done (status 0): Targets: 0 met, 0 MISSED, 12 of 12 NOT MEASURED.")


def test_a_cut_phase_and_the_phases_left_out_are_reported(tmp_path):
    results = tmp_path / "results"
    done = run_check(ROOT, results, CHECK_PHASES="ops_tests trainer", OPS_TESTS_TIMEOUT="2")
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-2000:]
    outcomes = phase_outcomes(results)
    assert outcomes.pop("ops_tests") == "CUT at its limit"
    assert outcomes.pop("trainer") == "finished"
    assert outcomes == {name: "not selected (CHECK_PHASES)" for name in PHASES if name not in ("ops_tests", "trainer")}
    assert "| ops_tests | CUT at its limit |" in (results / "summary.md").read_text()
    assert "done (status 1)" in done.stdout.splitlines()[-1]
