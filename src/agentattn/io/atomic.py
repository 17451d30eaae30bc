"""Atomic file writes, safe in a directory that others can write to.

Every output goes through :func:`atomic_path` (or :func:`atomic_open` on top of it):

1. a temp file beside the target, with an unpredictable name (``.NAME.tmp-PID-RANDOM``), created with
   ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a planted file or symlink is never opened or followed;
2. the writer writes it; it is flushed and fsynced;
3. ``os.replace`` renames it over the target (a symlink at the target is replaced, never written through);
4. the directory is fsynced, so the rename itself survives a crash.

A crash or a full disk at any point leaves either the previous file or the complete new one, never a part, and
the error names the target and says the previous file is unchanged. The PID in the temp name tells a later run
whether the writer is gone (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "open_log",
    "remove_stale_temp_files",
    "temp_writer_pid",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[A-Za-z0-9_]{8}")
_MAX_NAME_IN_TEMP = 120  # keeps the temp name under the 255-byte limit of most file systems


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _failed(path: Path, err: BaseException) -> OSError:
    reason = (err.strerror if isinstance(err, OSError) else None) or str(err) or type(err).__name__
    errno = err.errno if isinstance(err, OSError) else None
    return OSError(errno, f"{path} could not be written ({reason}); the previous file is unchanged")


def _fdopen(fd: int, mode: str) -> IO[Any]:
    """``os.fdopen`` (UTF-8 for text); a seam for tests that simulate a full disk."""
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path of a new, empty temp file beside ``path`` for a writer that takes a file name; on success
    it is fsynced and renamed over ``path``, on failure it is deleted.

    The temp name keeps ``path``'s suffix, for writers that pick a format from it. The parent directory must
    exist.

    Raises:
        OSError: the file could not be written (the message names ``path``; the previous file is unchanged).
    """
    path = Path(path)
    directory = path.parent
    try:
        fd, name = tempfile.mkstemp(
            prefix=f".{path.name[:_MAX_NAME_IN_TEMP]}.tmp-{os.getpid()}-", suffix=path.suffix, dir=directory
        )
    except OSError as err:
        raise _failed(path, err) from err
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.close(fd)
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_directory(directory)
        except OSError as err:
            raise _failed(path, err) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, atomically (see :func:`atomic_path`): the file object writes the temp
    file, which replaces ``path`` when the block ends without an exception.

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text).

    Raises:
        OSError: the file could not be written (the message names ``path``; the previous file is unchanged).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | _NOFOLLOW | _CLOEXEC)
        try:
            f = _fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path. The parent directory must exist."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, indent: int = 1, make_parents: bool = False
) -> Path:
    """Write ``obj`` as JSON (UTF-8, a final newline) to ``path`` atomically; return the path.

    With ``make_parents``, missing parent directories are created first (for an output path a user named).
    """
    if make_parents:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def open_log(path: str | os.PathLike, *, truncate: bool = False, binary: bool = False) -> IO[Any]:
    """Open an append-only log (metrics CSV/JSONL) for appending, or empty it first with ``truncate``.

    A symlink or any non-regular file at ``path`` is refused, never followed (a planted link would otherwise
    make the log overwrite the file it points to).

    Raises:
        OSError: ``path`` is a symlink or not a regular file, or cannot be opened.
    """
    path = Path(path)
    # O_NONBLOCK: opening a planted FIFO would otherwise wait forever for a reader. O_TRUNC is applied only once
    # the file is known to be a regular one.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if path.is_symlink():
            raise OSError(err.errno, f"{path} is a symlink; logs are never written through a link") from err
        raise OSError(err.errno, f"{path} cannot be opened as a log ({err.strerror})") from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file; logs are only written to regular files")
        os.set_blocking(fd, True)
        if truncate:
            os.ftruncate(fd, 0)
        return os.fdopen(
            fd, "ab" if binary else "a", **({} if binary else {"encoding": "utf-8", "newline": ""})
        )
    except BaseException:
        os.close(fd)
        raise


def temp_writer_pid(name: str) -> int | None:
    """The PID in a temp file name written by :func:`atomic_path`, or None for any other name."""
    match = _TEMP_NAME.match(name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files of :func:`atomic_path` under ``directory`` whose writer process is gone; return them.

    A live writer's temp file is left alone. Symlinked directories are not entered and symlinks are not touched.
    """
    removed = []
    for root, _dirs, files in os.walk(directory, followlinks=False):
        for name in files:
            pid = temp_writer_pid(name)
            path = Path(root) / name
            if pid is None or _alive(pid) or path.is_symlink():
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
