"""The errors mae_fast raises for problems a user can fix, each carrying the exit code of the CLI.

``mae_fast.pretrain`` prints any :class:`MaeFastError` as one line (``mae_fast.pretrain: error:
...``) and exits with its ``exit_code``: 2 for a mistake in what was asked (a flag, a file, a
backend), 1 for a run that stopped on its own (a diverged loss, a full disk, a stalled rank). Any
other exception is a bug in mae_fast and keeps its traceback. Set ``MAE_FAST_DEBUG=1`` or pass
``--debug`` to get the traceback of these errors too.

Each class also derives from the built-in exception it replaces (``ValueError``, ``RuntimeError``,
``OSError``), so code that caught those keeps working.
"""

from __future__ import annotations


def install_hint(extra: str) -> str:
    """How to install an optional part, as the README says it: ``pip install -e ".[fp8]"``, from the mae_fast
    folder (the package is installed from its checkout)."""
    return f'pip install -e ".[{extra}]" (in the mae_fast folder)'


class MaeFastError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 2


class ConfigError(MaeFastError, ValueError):
    """A flag or configuration value that cannot work; the message names the flag and the value."""


class DataError(MaeFastError, ValueError):
    """A data folder that is missing, empty, or holds nothing the chosen backend can read."""


class CheckpointError(MaeFastError, RuntimeError):
    """A checkpoint cannot be read, is not a mae_fast training checkpoint, or does not fit the run."""


class BackendUnavailableError(MaeFastError, RuntimeError):
    """An explicitly requested backend (kernels or data) cannot run here; the message says why."""


class OutputDirError(MaeFastError, OSError):
    """The output folder cannot be written (read-only, full, missing permissions); names the folder and cause."""

    exit_code = 1


class TrainingStopped(MaeFastError, RuntimeError):
    """The run stopped on its own; ``checkpoint`` is the one to resume from (None when there is none)."""

    exit_code = 1

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN or infinite; the run stopped without saving the broken state."""


class DivergedError(TrainingStopped):
    """The run ended with its loss still far out of its normal range: what it trained is not usable."""


class CollectiveTimeoutError(TrainingStopped):
    """A collective did not complete within ``--dist_timeout``: another rank stalled or died."""


__all__ = ["install_hint", "MaeFastError", "ConfigError", "DataError", "CheckpointError", "BackendUnavailableError",
           "OutputDirError", "TrainingStopped", "NonFiniteLossError", "DivergedError", "CollectiveTimeoutError"]
