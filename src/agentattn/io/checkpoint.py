"""Checkpoint files, read and written safely: the one checkpoint contract that models, train, dense and lm use.

- :func:`safe_torch_load` reads a ``torch.save`` file (zip or legacy format) with the restricted unpickler of
  :mod:`agentattn.io.unpickle`: no pickled code runs, unknown classes come back as inert placeholders.
- :func:`load_checkpoint` turns a checkpoint file (``torch.save`` or safetensors) into a state dict: it unwraps
  ``model`` / ``state_dict`` / EMA entries and strips wrapper prefixes (``module.``).
- :func:`load_tagged_checkpoint` reads a checkpoint one of this package's commands wrote (``agentattn train``,
  ``agentattn dense train``), checked by its format tag; the caller checks its fields.
- :func:`atomic_torch_save` and :func:`save_safetensors` write through :mod:`agentattn.io.atomic`: a crash
  leaves the old file or the new one, never a partial one.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_open, atomic_path
from .quote import quote
from .storages import _PLAIN_DTYPES, _Storage, _ViewBudget
from .unpickle import (
    PickledObject,
    UnsafeCheckpointError,
    _plain_unpickle,
    _RestrictedUnpickler,
    _StorageType,
)

__all__ = [
    "atomic_torch_save",
    "check_views_within_storages",
    "load_checkpoint",
    "load_tagged_checkpoint",
    "safe_torch_load",
    "save_safetensors",
]

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _zip_entry(zf: zipfile.ZipFile, name: str, archive_bytes: int) -> zipfile.ZipInfo:
    """The entry ``name``, checked to be stored (torch.save never compresses) and no larger than the archive."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(
            f"entry {quote(name)} is compressed; torch.save archives store their entries as they are"
        )
    if info.file_size > archive_bytes or info.file_size != info.compress_size:
        raise ValueError(
            f"entry {quote(name)} declares {info.file_size:,} bytes in an archive of {archive_bytes:,}"
        )
    return info


def _load_zip(zf: zipfile.ZipFile, archive_bytes: int) -> Any:
    names = zf.namelist()
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the archive holds entries more than once ({quote(twice)}); readers would disagree")
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkls:
        if any(n.endswith("constants.pkl") for n in names):
            raise ValueError("a TorchScript archive, not a torch.save checkpoint")
        raise ValueError("a zip archive without data.pkl, not a torch.save checkpoint")
    if len(pkls) > 1:
        raise ValueError(
            f"the archive holds {len(pkls)} records ({quote(pkls)}), a torch.save file holds one"
        )
    prefix = pkls[0][: -len("data.pkl")]
    entries = set(names)
    if any(n.startswith(prefix + "code/") for n in entries):
        raise ValueError(
            "a TorchScript archive, not a torch.save checkpoint (use torch.jit.load on trusted files)"
        )
    byteorder = "little"
    if prefix + "byteorder" in entries:
        _zip_entry(zf, prefix + "byteorder", archive_bytes)
        byteorder = zf.read(prefix + "byteorder")[:16].decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise ValueError(f"unknown byteorder {quote(byteorder)}")
    swap = byteorder != sys.byteorder
    loaded: dict[str, _Storage] = {}
    budget = _ViewBudget()

    def storages(pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise ValueError(f"unknown persistent id {quote(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unknown storage type {quote(storage_type)}")
        if not isinstance(key, (str, int)) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"malformed storage reference {quote(pid)}")
        key = str(key)
        if key not in loaded:
            name = f"{prefix}data/{key}"
            if name not in entries:
                raise ValueError(f"storage {quote(key)} is referenced but not in the archive")
            info = _zip_entry(zf, name, archive_bytes)
            nbytes = numel * storage_type.dtype.itemsize
            if info.file_size < nbytes:  # checked before anything is allocated
                raise ValueError(f"storage {quote(key)} has {info.file_size:,} bytes, expected {nbytes:,}")
            data = bytearray(zf.read(name))
            raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
            loaded[key] = _Storage(raw[:nbytes], storage_type.dtype, swap, budget)
        return loaded[key]

    _zip_entry(zf, pkls[0], archive_bytes)
    with zf.open(pkls[0]) as f:
        return _RestrictedUnpickler(io.BytesIO(f.read()), storages).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(f: Any, file_bytes: int) -> Any:
    """The pre-1.6 ``torch.save`` stream: magic, protocol, sys info, the pickle, storage keys, raw storages.

    The storages follow the pickle, so their sizes are declared before their bytes can be seen: the declared
    total is checked against the file's size before anything is allocated.
    """
    if _plain_unpickle(f) != _LEGACY_MAGIC:
        raise ValueError("not a torch.save file (bad magic number)")
    if _plain_unpickle(f) != _LEGACY_PROTOCOL:
        raise ValueError("unsupported legacy torch.save protocol")
    sys_info = _plain_unpickle(f)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise ValueError("big-endian legacy torch.save files are not supported")
    roots: dict[str, _Storage] = {}
    budget = _ViewBudget()
    declared = [0]

    def storages(pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise ValueError(f"unknown persistent id {quote(pid)}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unknown storage type {quote(storage_type)}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"malformed storage reference {quote(pid)}")
        size = storage_type.dtype.itemsize
        if key not in roots:  # filled after the pickle, from the raw section
            declared[0] += numel * size
            if declared[0] > file_bytes:
                raise ValueError(
                    f"the storages declare {declared[0]:,} bytes, more than the file's {file_bytes:,}"
                )
            roots[key] = _Storage(
                torch.zeros(numel * size, dtype=torch.uint8), storage_type.dtype, budget=budget
            )
        root = roots[key]
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
                raise ValueError(f"malformed storage view {quote(view)}")
            _view_key, offset, view_size = view
            if offset < 0 or view_size < 0 or (offset + view_size) * size > root.raw.numel():
                raise ValueError(f"storage view {quote(view)} lies outside its storage")
            return _Storage(root.raw[offset * size : (offset + view_size) * size], root.dtype, budget=budget)
        return root

    result = _RestrictedUnpickler(f, storages).load()
    keys = _plain_unpickle(f)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"malformed storage key list {quote(keys)}")
    for key in keys:
        if key not in roots:
            raise ValueError(f"storage {quote(key)} listed but not referenced")
        root = roots[key]
        header = f.read(8)
        if len(header) != 8:
            raise ValueError("truncated storage section")
        (numel,) = struct.unpack("<q", header)
        size = root.dtype.itemsize
        if numel * size != root.raw.numel():
            raise ValueError(
                f"storage {quote(key)} has {numel} elements, the pickle says {root.raw.numel() // size}"
            )
        if numel and f.readinto(memoryview(root.raw.numpy())) != numel * size:
            raise ValueError(f"storage {quote(key)} is truncated")
    return result


def safe_torch_load(path: PathLike) -> Any:
    """Read a ``torch.save`` file (zip or legacy format) without executing pickled code.

    Tensors come back on the CPU; unknown classes come back as :class:`PickledObject` placeholders.

    Raises:
        UnsafeCheckpointError: the pickle calls a non-allow-listed callable (it is not called).
        ValueError: the file is truncated, corrupted or not a ``torch.save`` file (the message names it).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            size = os.fstat(f.fileno()).st_size
            if head.startswith(b"PK"):
                with zipfile.ZipFile(f) as zf:
                    return _load_zip(zf, size)
            if head[:1] == b"\x80":
                return _load_legacy(f, size)
            raise ValueError("not a torch.save file (neither a zip archive nor a pickle)")
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except OSError:
        raise
    except (ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError, RuntimeError, OverflowError,
            MemoryError, RecursionError, struct.error, pickle.UnpicklingError, zipfile.BadZipFile,
            UnicodeDecodeError, NotImplementedError) as err:  # fmt: skip
        text = " ".join(str(err).split())
        text = text if len(text) <= 300 else text[:297] + "..."
        what = type(err).__name__ if not text else f"{type(err).__name__}: {text}"
        raise ValueError(f"{path}: truncated, corrupted or not a torch checkpoint ({what})") from err


def load_tagged_checkpoint(path: PathLike, format_tag: str, written_by: str) -> dict[str, Any]:
    """Read a checkpoint that one of this package's commands wrote: a dict whose ``format`` is ``format_tag``,
    read with :func:`safe_torch_load`. Its other fields are the caller's to check.

    Raises:
        ValueError: a missing, unreadable or corrupted file, or one without the tag (the message names
            ``written_by``, the command that writes such files, e.g. "agentattn train").
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != format_tag:
        raise ValueError(f"{path}: not a checkpoint written by `{written_by}` (no {format_tag!r} tag)")
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files -> state dicts.

_EMA_KEYS = ("state_dict_ema", "model_ema")
_MODEL_KEYS = ("model", "state_dict")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and all(isinstance(v, torch.Tensor) or v is None for v in obj.values())
    )


def _short(keys: list[Any], limit: int = 12) -> str:
    shown = ", ".join(quote(k, 80) for k in keys[:limit])
    return f"[{shown}" + (f", ... ({len(keys)} in all)]" if len(keys) > limit else "]")


def _check_state_dict(state: Any, path: Path, where: str) -> None:
    if isinstance(state, PickledObject) and not state:
        raise ValueError(
            f"{path}: {where} is a pickled {state.pickled_module}.{state.pickled_name} object, not a state dict "
            "(save model.state_dict() instead)"
        )
    if not _is_state_dict(state):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) and v is not None]
        raise ValueError(
            f"{path}: {where} is not a state dict (non-tensor entries {_short(bad)}, or no tensors)"
        )


def _unwrap(obj: Any, use_ema: bool, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    keys = list(obj)
    if use_ema:
        found = next((k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if found is None:
            raise ValueError(
                f"{path}: no EMA weights ({' or '.join(_EMA_KEYS)}); the file has keys {_short(keys)}"
            )
        state, where = obj[found], f"entry {found!r}"
    elif _is_state_dict(obj):
        state, where = obj, "the file"
    else:
        found = next((k for k in _MODEL_KEYS if isinstance(obj.get(k), Mapping)), None)
        if found is None:
            if isinstance(obj, PickledObject) and not obj:
                _check_state_dict(obj, path, "the file")  # a pickled module: say so
            hint = " (EMA weights present: pass use_ema=True)" if any(k in obj for k in _EMA_KEYS) else ""
            raise ValueError(
                f"{path}: no state dict found ('model' or 'state_dict'); the file has keys {_short(keys)}{hint}"
            )
        state, where = obj[found], f"entry {found!r}"
    _check_state_dict(state, path, where)
    return _strip_wrapper_prefix(
        {k: (v.detach() if isinstance(v, nn.Parameter) else v) for k, v in state.items() if v is not None},
        path,
    )


def _strip_wrapper_prefix(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix of DataParallel / DDP wrappers; two keys that become one are refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name in out:
            raise ValueError(
                f"{path}: keys {quote(name, 120)} and {quote('module.' + name, 120)} name the same weight; "
                "which one to load is ambiguous"
            )
        out[name] = value
    return out


def load_checkpoint(path: PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict safely from ``.safetensors``, ``.pth``/``.pt``/``.bin`` (``torch.save``) files.

    Training-script dicts are unwrapped: ``model`` (official Agent-Attention scripts), ``state_dict``, or with
    ``use_ema`` the ``state_dict_ema``/``model_ema`` entry; ``module.`` prefixes are stripped. A bare state dict
    works too. Pickled files go through :func:`safe_torch_load` (no pickled code runs).

    Returns:
        ``{name: tensor}`` on the CPU, shapes as saved.

    Raises:
        ValueError: missing, truncated, corrupted or non-checkpoint files, or no EMA weights with ``use_ema``;
            :class:`UnsafeCheckpointError` when the pickle would call code.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(9)
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if path.suffix == ".safetensors" or (looks_safetensors and not head.startswith((b"PK", b"\x80"))):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path}: truncated, corrupted or not a safetensors file ({err})") from err
        if use_ema:
            _logger.info("%s: a safetensors file holds one state dict; use_ema is ignored", path)
        return _strip_wrapper_prefix(state, path)
    return _unwrap(safe_torch_load(path), use_ema, path)


# ---------------------------------------------------------------------------------------------------------------
# Saving.


class _KeepWriteError:
    """File wrapper that keeps the OSError of a failed write (torch.save reports it as an unrelated RuntimeError)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace``.

    A crash at any point leaves either the old file or the new one in place, never a partial one.

    Raises:
        OSError: the write failed (disk full, ...); the message names ``path`` and says the previous file is
            unchanged. The temp file is removed.
    """
    with atomic_open(path, "wb") as f:
        writer = _KeepWriteError(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as err:
            if writer.error is None:
                raise
            raise writer.error from err
        f.flush()


def check_views_within_storages(state_dict: Mapping[str, Any]) -> None:
    """ValueError when the tensors hold more bytes than their storages: a contiguous copy of them (what
    safetensors writes) would be larger than what was read, e.g. a stride-0 view of one float as 1 GiB."""
    storages: dict[int, int] = {}
    total = 0
    for value in state_dict.values():
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized:
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            total += value.numel() * value.element_size()
    held = sum(storages.values())
    if total > held:
        raise ValueError(
            f"the tensors are views that repeat their storages' bytes ({total:,} bytes of tensors over {held:,} "
            "bytes of storage); a copy would be larger than the file"
        )


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` as a safetensors file: contiguous CPU clones, so shared storages are fine.

    ``metadata`` values must be strings. The file is written next to ``path`` first and renamed into place.
    """
    from safetensors.torch import save_file

    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"save_safetensors: entry {quote(key)} is a {type(value).__name__}, not a tensor"
            )
        if value.layout != torch.strided or value.is_quantized or value.dtype not in _PLAIN_DTYPES:
            raise ValueError(
                f"save_safetensors: entry {quote(key)} is a {value.dtype} {value.layout} tensor; safetensors holds "
                "dense tensors of plain dtypes"
            )
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except OSError:
            raise
        except Exception as err:  # safetensors reports a failed write as SafetensorError
            raise OSError(str(err)) from err
