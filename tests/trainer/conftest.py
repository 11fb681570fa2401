"""Trainer tests compare the loss of one run's log lines with another's: lines come by step only."""

import pytest


@pytest.fixture(autouse=True)
def _lines_by_step_only(monkeypatch):
    """A run prints its step lines every ``--log_every`` steps only, never by time, so that two runs' ``history``
    windows are the same steps whatever the machine's load (a test of the time-based lines sets its own values)."""
    monkeypatch.setattr("mae_fast.progress.FIRST_LINE_SECONDS", float("inf"))
    monkeypatch.setattr("mae_fast.progress.LINE_SECONDS", float("inf"))
