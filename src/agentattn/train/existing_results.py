"""Earlier results in a run directory: which of a run's own files already hold something, and what a new run may
do about them. :func:`prepare_output` refuses unless the run is told to ``overwrite`` them, and then deletes
the run's own known files only (:func:`remove_results`): no unknown file, no symlink, nothing a live run holds.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..io import RunDirectoryInUse, lock_run_directory, run_directory_holder

__all__ = ["prepare_output", "remove_results", "results_in"]

PathLike = str | os.PathLike


def _is_result(path: Path) -> bool:
    """A regular, non-empty file (not a symlink: links are refused where the run opens them)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def _expand(directory: Path, names: Iterable[str]) -> list[Path]:
    """The paths ``names`` give in ``directory``, glob patterns expanded (sorted), each path once."""
    out: list[Path] = []
    for name in names:
        if any(c in name for c in "*?["):
            out += sorted(p for p in directory.glob(name) if p not in out)
        elif directory / name not in out:
            out.append(directory / name)
    return out


def results_in(directory: PathLike, names: Iterable[str]) -> list[str]:
    """Which of ``names`` (relative paths, glob patterns allowed) are results in ``directory``: regular files
    with something in them."""
    directory = Path(directory)
    return [p.relative_to(directory).as_posix() for p in _expand(directory, names) if _is_result(p)]


def remove_results(directory: PathLike, names: Iterable[str]) -> list[str]:
    """Delete the regular files among ``names`` in ``directory`` (a run's own known files); return them.

    Nothing else is touched: no unknown file, no symlink (a run refuses those where it opens them). A
    sub-directory is locked while its files go (:class:`RunDirectoryInUse` if a live run holds it).
    """
    directory = Path(directory)
    removed: list[str] = []
    by_dir: dict[Path, list[Path]] = {}
    for path in _expand(directory, names):
        by_dir.setdefault(path.parent, []).append(path)
    for parent, paths in by_dir.items():
        if parent != directory and (parent.is_symlink() or not parent.is_dir()):
            continue  # never follow a link out of the run directory
        with _held(parent, directory):
            for path in paths:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    path.unlink()
                    removed.append(path.relative_to(directory).as_posix())
    return removed


@contextlib.contextmanager
def _held(sub: Path, top: Path) -> Iterator[None]:
    """Lock ``sub`` for the block unless it is ``top`` (which the caller holds already)."""
    if sub == top:
        yield
    else:
        with lock_run_directory(sub):
            yield


def prepare_output(directory: PathLike, names: Sequence[str], overwrite: bool) -> list[str]:
    """Before a new (not resumed) run writes into ``directory``, which the caller holds locked: refuse if it
    already holds results of an earlier run (any of ``names``), or, with ``overwrite``, delete them.

    Sub-directories among ``names`` (a comparison's twins) that a live run holds are refused as in use.
    Returns the files deleted.

    Raises:
        ValueError: results exist and ``overwrite`` is off (the message names the directory and the ways on).
        RunDirectoryInUse: a live run holds a sub-directory.
    """
    directory = Path(directory)
    for sub in sorted({p.parent for p in _expand(directory, names)} - {directory}):
        holder = run_directory_holder(sub) if sub.is_dir() else None
        if holder is not None:
            who = f"PID {holder}" if holder > 0 else "another process"
            raise RunDirectoryInUse(f"{sub} is in use by another run ({who}); wait for it to finish")
    found = results_in(directory, names)
    if not found:
        return []
    if not overwrite:
        raise ValueError(
            f"{directory} already holds results of an earlier run ({_list(found)}): choose another "
            "output directory, or set overwrite to replace them"
        )
    return remove_results(directory, names)


def _list(found: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``found``, comma-separated, and how many more there are."""
    shown = ", ".join(found[:limit])
    return shown + (f" and {len(found) - limit} more" if len(found) > limit else "")
