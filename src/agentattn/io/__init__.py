"""The ground floor for files: one atomic writer, append-only logs that never follow links, run directories that
belong to one live run, and checkpoint files read without running pickled code. Everything that writes or reads
a file imports it from here."""

from .atomic import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    open_log,
    remove_stale_temp_files,
    temp_writer_pid,
)
from .checkpoint import (
    atomic_torch_save,
    check_views_within_storages,
    load_checkpoint,
    load_tagged_checkpoint,
    safe_torch_load,
    save_safetensors,
)
from .quote import one_line, quote
from .rundir import RunDirectoryInUse, lock_run_directory, run_directory_holder
from .unpickle import PickledObject, UnsafeCheckpointError

__all__ = [
    "PickledObject",
    "RunDirectoryInUse",
    "UnsafeCheckpointError",
    "atomic_open",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_views_within_storages",
    "load_checkpoint",
    "load_tagged_checkpoint",
    "lock_run_directory",
    "one_line",
    "open_log",
    "quote",
    "remove_stale_temp_files",
    "run_directory_holder",
    "safe_torch_load",
    "save_safetensors",
    "temp_writer_pid",
]
