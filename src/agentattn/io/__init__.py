"""The ground floor for files: one atomic writer, append-only logs that never follow links, and run directories
that belong to one live run. Everything that writes a file imports it from here."""

from .atomic import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    open_log,
    remove_stale_temp_files,
    temp_writer_pid,
)
from .quote import one_line, quote
from .rundir import RunDirectoryInUse, lock_run_directory, run_directory_holder

__all__ = [
    "RunDirectoryInUse",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "lock_run_directory",
    "one_line",
    "open_log",
    "quote",
    "remove_stale_temp_files",
    "run_directory_holder",
    "temp_writer_pid",
]
