"""What the commands share on the command line: their name as launched, one line per mistake, defaults stated once.

Every command (``pretrain``, ``prepare``, ``linprobe``, ``export``, ``info``) parses with :class:`CommandParser`: a
mistake argparse finds (a value of the wrong type, an unknown flag, several values where one belongs) is one line,
``mae_fast.<command>: error: ...``, exit code 2, without the usage (``--help`` shows it). Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from pathlib import Path


def launcher() -> str:
    """How this process was started, as the usage shows it: ``torchrun -m`` under torchrun (which sets
    ``LOCAL_WORLD_SIZE`` in every process it starts), else ``python -m``."""
    return "torchrun -m" if "LOCAL_WORLD_SIZE" in os.environ else "python -m"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds ``(default: X)`` to an option's help unless its text already says what the default is, or there is no
    value to show (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


# argparse's messages, and the one line each becomes: the flag first, then what it needs, then the value given.
_ARGPARSE_MESSAGES = [
    (re.compile(r"argument (?P<flag>\S+): invalid int value: (?P<value>.+)"), "{flag}: must be an integer, got {value}"),
    (re.compile(r"argument (?P<flag>\S+): invalid float value: (?P<value>.+)"), "{flag}: must be a number, got {value}"),
    (re.compile(r"argument (?P<flag>\S+): invalid choice: (?P<value>'[^']*') \(choose from (?P<choices>.*)\)"),
     "{flag}: must be one of {choices}, got {value}"),
    (re.compile(r"argument (?P<flag>\S+): expected one argument"), "{flag}: needs a value"),
]


def brace_pattern(names: list[str]) -> str | None:
    """The brace pattern the shell expanded into ``names`` (``a-000.tar a-001.tar a-002.tar`` -> ``a-{000..002}.tar``),
    or None when they are not one numbered run."""
    prefix = os.path.commonprefix(names).rstrip("0123456789")
    suffix = os.path.commonprefix([name[::-1] for name in names])[::-1].lstrip("0123456789")
    if len(names) < 2 or len(prefix) + len(suffix) >= min(map(len, names)):
        return None
    numbers = [name[len(prefix):len(name) - len(suffix)] for name in names]
    if not all(n.isdigit() and len(n) == len(numbers[0]) for n in numbers):
        return None
    if [int(n) for n in numbers] != list(range(int(numbers[0]), int(numbers[0]) + len(numbers))):
        return None
    return f"{prefix}{{{numbers[0]}..{numbers[-1]}}}{suffix}"


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` for the command ``command`` (``mae_fast.pretrain``): the usage names the launcher
    (:func:`launcher`), help texts state each default once (:class:`HelpFormatter`), and a mistake is one line on
    stderr, ``<command>: error: ...``, then exit code 2."""

    def __init__(self, command: str, **kwargs):
        self.command = command
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=f"{launcher()} {command}", **kwargs)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._extras_message(args, extras))
        return namespace

    def _extras_message(self, args: list[str], extras: list[str]) -> str:
        """Several values after a flag that takes one are what the shell makes of an unquoted brace pattern or
        wildcard: say so; anything else is an unknown argument."""
        for i, arg in enumerate(args):
            flag, equals, inline = arg.partition("=")
            action = self._option_string_actions.get(flag)
            if action is None or action.nargs is not None:  # not a flag that takes one value
                continue
            following = list(itertools.takewhile(lambda a: not a.startswith("-"), args[i + 1:]))
            values = [inline, *following] if equals else following
            if len(values) > 1 and all(value in extras for value in values[1:]):
                shown = " ".join(values[:3]) + (" ..." if len(values) > 3 else "")
                message = f"{flag} takes one value, got {len(values)} ({shown})"
                if not all(os.sep in value or "." in value for value in values):
                    return message
                pattern = brace_pattern(values)
                example = f"{flag} '{pattern}'" if pattern else f"{flag} 'train-{{000000..000127}}.tar'"
                return (f"{message}: the shell expanded a brace pattern or wildcard into several names; put it in "
                        f"quotes: {example}")
        return f"unrecognized arguments: {' '.join(extras)} ({self.prog} --help lists the flags)"

    def error(self, message: str):
        for pattern, line in _ARGPARSE_MESSAGES:
            match = pattern.fullmatch(message)
            if match:
                message = line.format(**match.groupdict())
                break
        print(f"{self.command}: error: {message}", file=sys.stderr, flush=True)
        self.exit(2)


def first_missing_folder(path: str | os.PathLike) -> Path | None:
    """The outermost folder on the way to ``path`` that does not exist yet (creating ``path`` creates it), or None when
    ``path`` exists."""
    missing = Path(path).expanduser().absolute()
    if missing.exists():
        return None
    while not missing.parent.exists():
        missing = missing.parent
    return missing


def remove_empty_folders(path: str | os.PathLike, up_to: Path | None) -> None:
    """Remove the folder ``path``, then the folders above it up to ``up_to`` (:func:`first_missing_folder` before the
    run), each only while it is empty: a run stopped by an early error leaves no folder it created. Anything holding
    a file stays."""
    if up_to is None:
        return
    folder = Path(path).expanduser().absolute()
    while True:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            return
        if folder == up_to or up_to not in folder.parents:
            return
        folder = folder.parent


__all__ = ["CommandParser", "HelpFormatter", "brace_pattern", "first_missing_folder", "launcher",
           "remove_empty_folders"]
