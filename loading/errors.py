"""The project's error types: bad input, which a command reports as one ``error:`` line.

Each is raised where the bad input is detected: a dataset file (``DataError``), a CLIP checkpoint or vocabulary
(``CLIPLoadError``), an option or a checkpoint field out of range (``ConfigError``), the run folder or the
command's use (``RunError``). ``plumbing.cli.reported_errors`` prints ``EXPECTED_ERRORS`` as one line; anything
else, a ``ValueError`` or ``RuntimeError`` from inside the model or the loop included, is a bug and keeps its
traceback.
"""

import math
from typing import Any


class UserError(Exception):
    """Bad input: its message is all the user sees. Picklable (one argument), so a DataLoader worker can send it."""


class DataError(UserError):
    """A missing file or folder, an unknown name, a broken video in strict mode."""


class CLIPLoadError(UserError):
    """A checkpoint or vocabulary that cannot be found, fetched or read."""


class ConfigError(UserError):
    """An option or a checkpoint field of the wrong type or out of range, named in the message."""


class RunError(UserError):
    """The run folder, a checkpoint or the command's use of them: what the user must change."""


class RankError(RunError):
    """A failure this process met alone (its share of the data, joining the others): reported by it, not rank 0."""


EXPECTED_ERRORS = (UserError, OSError)  # OSError: the file system's (a full disk, a read-only folder)


def error_message(error: Exception) -> str:
    """What the user reads after ``error:``; a file-system error as ``<path>: <reason>`` ("/data/run: Permission
    denied"), its text if it names no path."""
    if not isinstance(error, OSError) or error.filename is None:
        return str(error)
    target = f" -> {error.filename2}" if error.filename2 is not None else ""
    return f"{error.filename}{target}: {error.strerror or error}"


def is_number(value: Any, low: float = -math.inf, high: float = math.inf, *, integer: bool = False) -> bool:
    """Whether ``value`` is a finite number in ``[low, high]`` (an ``int`` when ``integer``), never a ``bool``: the
    check of an option or a checkpoint field before anything is built from it."""
    kind = int if integer else int | float
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high
