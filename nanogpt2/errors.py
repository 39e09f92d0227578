"""The errors a command turns into one line on stderr and a non-zero exit (train.py's `main`, the CLIs).

Anything else raised is a bug and keeps its traceback.
"""


class ConfigError(Exception):
    """Flags, or flags and a checkpoint, that make the run impossible; the message names the flag to change."""


class DataError(Exception):
    """Data that cannot be used: a missing path, a malformed shard, out-of-vocabulary tokens, too few tokens."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or not of the model that wants it."""


class DivergedError(Exception):
    """Training stopped because the loss or the gradient norm is no longer finite."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, DivergedError)
