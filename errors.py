"""The errors a command reports as one ``error:`` line: bad input, never a bug. Machinery a learner may skip.

``cli.reported_errors`` turns each of ``EXPECTED_ERRORS`` into ``error: <message>`` and exit code 1; anything else
is a bug and keeps its traceback.
"""

from clip_model import CLIPLoadError
from dataset_files import DataError, os_error_message


class RunError(Exception):
    """Bad input to a command: its message is all the user sees."""


class RankError(RunError):
    """A failure this process met alone (its share of the data, joining the others): reported by it, not rank 0."""


EXPECTED_ERRORS = (RunError, CLIPLoadError, DataError, ValueError, OSError)


def error_message(error: Exception) -> str:
    """What the user reads after ``error:``; a file-system error names its path (``dataset_files.os_error_message``)."""
    return os_error_message(error) if isinstance(error, OSError) else str(error)
