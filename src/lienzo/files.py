"""Neutral file helpers every layer may use: writing a file so that a crash never leaves half of it."""

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path`` with what ``write(file)`` writes, so that readers see either no file or the whole file.

    The bytes go to a hidden temporary file in the same folder, ``.<name>.<random>.tmp``
    (``os.replace`` is atomic only within one file system), are flushed to disk, then the file is
    renamed over ``path``. Parent folders are created. The file gets the permissions of any new
    file (0666 less the umask), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    with finished_temp(path, write) as temp_name:
        os.replace(temp_name, path)
    return path


@contextmanager
def finished_temp(path: Path, write: Callable[[BinaryIO], object]) -> Iterator[Path]:
    """A hidden temporary file beside ``path``, ``.<name>.<random>.tmp`` (the pattern ``lienzo gallery
    reconcile`` cleans up after a crash), holding what ``write(file)`` wrote, flushed to disk; it is
    removed on leaving unless it was renamed away. Parent folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    handle = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as temp:
            write(temp)
            temp.flush()
            os.fsync(temp.fileno())
        yield temp_name
    finally:
        # Also on a Ctrl-C (not an Exception) mid-save: no temporary file is left behind.
        temp_name.unlink(missing_ok=True)
