"""A run directory belongs to one live run: an exclusive ``flock`` on ``DIR/.agentattn.lock`` for the run's life.

A second run into the same directory fails at once with an error naming the directory and the holder's PID.
The lock is released by the kernel when the holder exits, however it exits, so a killed run never leaves the
directory locked. The lock file itself stays (removing it would race with a run that is just opening it), except
in a directory the run created and left empty because it failed: a rejected run leaves no empty directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .atomic import _NOFOLLOW, remove_stale_temp_files

__all__ = ["LOCK_NAME", "RunDirectoryInUse", "lock_run_directory", "run_directory_holder"]

LOCK_NAME = ".agentattn.lock"


class RunDirectoryInUse(OSError):
    """Another live run holds the output directory."""


def _open_lock(directory: Path) -> int:
    try:
        return os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise OSError(
            err.errno, f"{directory}: cannot open its lock file {LOCK_NAME} ({err.strerror})"
        ) from err


def run_directory_holder(directory: str | os.PathLike) -> int | None:
    """The PID of the live run that holds ``directory``, or None when no run holds it."""
    path = Path(directory) / LOCK_NAME
    if not path.is_file() or path.is_symlink():
        return None
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def lock_run_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Create ``directory`` if needed, hold it exclusively for the block, and remove temp files that a dead
    writer left in it.

    Raises:
        RunDirectoryInUse: another live run holds it (the message names the directory and the holder's PID).
        OSError: the directory cannot be created or locked.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(directory)
    failed = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            who = f"PID {holder}" if holder else "another process"
            raise RunDirectoryInUse(
                f"{directory} is in use by another run ({who}); wait for it to finish or choose another output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temp_files(directory)
        try:
            yield directory
        except BaseException:
            failed = True
            raise
    finally:
        if failed and created:
            _remove_if_only_the_lock(
                directory
            )  # still locked: a run that opened the lock file meanwhile fails
        os.close(fd)  # releases the lock


def _remove_if_only_the_lock(directory: Path) -> None:
    """Remove the lock file and the directory when nothing else is in it (best effort, never raises)."""
    with contextlib.suppress(OSError):
        if [entry.name for entry in os.scandir(directory)] == [LOCK_NAME]:
            os.unlink(directory / LOCK_NAME)
            os.rmdir(directory)
