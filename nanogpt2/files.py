"""Writing files so that a crash at any moment leaves the old file or the new one, never a torn one.

Owns `write_atomic` and where the user's cache directory is (`user_cache_home`); what goes into the files belongs to
the modules that write them (checkpoint.py, data.py, run.py, hf.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from nanogpt2.errors import WriteError


def write_atomic(path: str | Path, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write `content` (bytes, text, or a function that writes into a binary file) to `path` atomically.

    The data go to a temp file beside `path`, which is fsynced, renamed over `path`, and the directory fsynced, so
    the rename survives a power cut too. A write that fails (a full disk, say) leaves `path` as it was, removes the
    temp file and raises WriteError, which names the path and the errno. The file is created with mode 0o666 less the
    umask, like any other file (readable by the group under the usual umask 022), not 0600 as tempfile's would be. A
    temp file left by a process killed mid-write is `.{name}.tmp-{pid}`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as raw:
            f = _FailureRecordingFile(raw)
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # A writer may turn the OSError of a full disk into its own error (torch.save raises a RuntimeError).
        failure = err if isinstance(err, OSError) else f.failure if f is not None else None
        if failure is not None:
            raise WriteError(path, failure) from None
        raise
    return path


class _FailureRecordingFile:
    """A binary file that remembers the OSError its write or flush raised, whatever the caller makes of it."""

    def __init__(self, f: BinaryIO):
        self._f, self.failure = f, None

    def write(self, data) -> int:
        return self._recorded(self._f.write, data)

    def flush(self) -> None:
        self._recorded(self._f.flush)

    def _recorded(self, operation, *args):
        try:
            return operation(*args)
        except OSError as err:
            self.failure = err
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def user_cache_home() -> Path:
    """The user's cache directory by the XDG rule: $XDG_CACHE_HOME, else ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
