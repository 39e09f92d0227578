"""The errors a command turns into one line on stderr and a non-zero exit (train.py's `main`, the CLIs).

Anything else raised is a bug and keeps its traceback.
"""

import errno
from pathlib import Path


class ConfigError(Exception):
    """Flags, or flags and a checkpoint, that make the run impossible; the message names the flag to change."""


class DataError(Exception):
    """Data that cannot be used: a missing path, a malformed shard, out-of-vocabulary tokens, too few tokens."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or not of the model that wants it."""


class WriteError(Exception):
    """An output that could not be written (a full disk, a quota, an I/O error, a read-only directory); the file it
    was to replace is intact."""

    def __init__(self, path: str | Path, err: OSError):
        super().__init__(f"cannot write {path}: {os_error_text(err)}")


def os_error_text(err: BaseException) -> str:
    """An error as one line that names the errno: "ENOSPC (No space left on device)"."""
    if isinstance(err, OSError) and err.errno:
        return f"{errno.errorcode.get(err.errno, f'errno {err.errno}')} ({err.strerror})"
    return f"{type(err).__name__}: {err}".splitlines()[0]


class DivergedError(Exception):
    """Training stopped because the loss or the gradient norm is no longer finite."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, WriteError, DivergedError)
