"""Safe checkpoint loading: a restricted unpickler for ``torch.save`` files, unwrapping, resizing and saving.

Official Agent-Attention checkpoints are ``torch.save`` dicts holding ``model``, ``optimizer``, ``lr_scheduler``,
``epoch`` and a pickled yacs ``CfgNode`` config. ``torch.load(weights_only=True)`` refuses them (the CfgNode is
not allow-listed) and ``weights_only=False`` runs whatever the pickle says. The loader here reads the pickle
with its own unpickler:

- tensors, ``OrderedDict``, ``torch.Size``/``device``/dtypes and plain builtin containers load;
- any other class named by the pickle becomes an inert placeholder (a ``dict`` subclass keeping the items,
  constructor arguments and state that the pickle gives it); its module is never imported;
- calling anything that is not allow-listed (``os.system``, ``builtins.eval``, a placeholder class, ...) raises
  :class:`UnsafeCheckpointError`; nothing named by the file is ever called unless allow-listed.
"""

from __future__ import annotations

import collections
import io
import logging
import math
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_path, quote

__all__ = [
    "PickledObject",
    "UnsafeCheckpointError",
    "check_views_within_storages",
    "load_checkpoint",
    "load_pretrained",
    "resize_agent_bias_tables",
    "safe_torch_load",
    "save_safetensors",
]

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle asks to call something the safe loader does not allow (it is never called)."""


# ---------------------------------------------------------------------------------------------------------------
# Placeholders for classes the loader does not import.


class PickledObject(dict):
    """Inert stand-in for an instance of a class that the safe loader does not import.

    It is a ``dict`` (a yacs ``CfgNode`` keeps its items); ``pickled_args`` holds the ``__new__`` arguments,
    ``pickled_state`` the ``BUILD`` state and ``pickled_list`` any appended items. Attribute access falls back to
    the items, then to a dict state, so ``config.MODEL.TYPE`` reads like it does on a CfgNode.
    """

    pickled_module: str = ""
    pickled_name: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never called by the unpickler
        super().__init__()
        self.__dict__.update(pickled_args=args, pickled_state=None, pickled_list=[])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self:
            return self[name]
        state = self.__dict__.get("pickled_state")
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(f"{type(self).__name__} placeholder has no attribute {name!r}")

    def append(self, item: Any) -> None:
        self.__dict__["pickled_list"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["pickled_list"].extend(items)

    def __repr__(self) -> str:
        return f"<placeholder {self.pickled_module}.{self.pickled_name} {dict.__repr__(self)}>"

    def __reduce__(self):  # re-pickling gives a plain dict, never the original class
        return (dict, (dict(self),))


_PLACEHOLDERS: dict[tuple[str, str], type[PickledObject]] = {}


def _placeholder_class(module: str, name: str) -> type[PickledObject]:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        cls = type(
            name, (PickledObject,), {"pickled_module": module, "pickled_name": name, "__module__": __name__}
        )
        _PLACEHOLDERS[key] = cls
    return _PLACEHOLDERS[key]


def _new_placeholder(cls: type[PickledObject], args: tuple) -> PickledObject:
    inst = dict.__new__(cls)
    inst.__dict__.update(pickled_args=tuple(args), pickled_state=None, pickled_list=[])
    return inst


# ---------------------------------------------------------------------------------------------------------------
# Storages and the allow-listed rebuild functions (our own code, not torch's: nothing from the file is called).


# Views may overlap (``expand``ed buffers are saved with stride 0), but a copy of them must not turn a small
# file into a huge tensor: the bytes that views hold beyond their storages are capped per file.
MAX_VIEW_EXCESS_BYTES = 16 * 2**20


class _ViewBudget:
    def __init__(self) -> None:
        self.excess = 0

    def charge(self, extra: int) -> None:
        if extra > 0:
            self.excess += extra
            if self.excess > MAX_VIEW_EXCESS_BYTES:
                raise ValueError(
                    f"tensors are views that repeat their storages' bytes ({self.excess:,} bytes beyond what the "
                    f"storages hold; at most {MAX_VIEW_EXCESS_BYTES:,} is allowed)"
                )


class _Storage:
    """Raw bytes of one saved storage with the dtype its type names (uint8 for ``UntypedStorage``)."""

    def __init__(
        self,
        raw: torch.Tensor,
        dtype: torch.dtype,
        swap_bytes: bool = False,
        budget: _ViewBudget | None = None,
    ) -> None:
        self.raw = raw  # 1-D uint8
        self.dtype = dtype
        self.swap_bytes = swap_bytes
        self.budget = budget if budget is not None else _ViewBudget()
        self._views: dict[torch.dtype, torch.Tensor] = {}

    def charge_view(self, nbytes: int) -> None:
        """Count a view's bytes beyond its storage's (stride-0 or overlapping views) against the file's budget."""
        self.budget.charge(nbytes - self.raw.numel())

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._views:
            size = dtype.itemsize
            if self.raw.numel() % size:
                raise ValueError(
                    f"storage of {self.raw.numel()} bytes is not a whole number of {dtype} elements"
                )
            raw = self.raw
            if self.swap_bytes and size > 1:
                # Big-endian file: reverse the bytes of each element (each half of a complex number).
                unit = size // 2 if dtype.is_complex else size
                raw = raw.view(-1, unit).flip(-1).reshape(-1)
            self._views[dtype] = raw.view(dtype)
        return self._views[dtype]


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}


class _StorageType:
    """What the unpickler returns for ``torch.<X>Storage``: just the dtype (the class is never touched)."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype


def _rebuild(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None
) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor rebuilt from {type(storage).__name__}, not from a saved storage")
    flat = storage.typed(dtype if dtype is not None else storage.dtype)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or int(offset) < 0:
        raise ValueError(f"invalid tensor layout: size {size}, stride {stride}, offset {offset}")
    if all(size):
        extent = int(offset) + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        if extent > flat.numel():
            raise ValueError(
                f"tensor of size {quote(size)} needs {extent} elements, its storage has {flat.numel()}"
            )
        storage.charge_view(math.prod(size) * flat.element_size())
        return torch.as_strided(flat, size, stride, int(offset))
    return flat.new_zeros(size)


def _apply_metadata(tensor: torch.Tensor, metadata: Any) -> torch.Tensor:
    if metadata:
        # Only the conj/neg bits exist; anything else is not a torch.save file.
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise ValueError(f"unknown tensor metadata {quote(metadata)}")
        torch._utils.set_tensor_metadata(tensor, {k: bool(v) for k, v in metadata.items()})
    return tensor


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _apply_metadata(_rebuild(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(dtype, torch.dtype) or dtype not in _PLAIN_DTYPES:
        raise ValueError(
            f"_rebuild_tensor_v3 given dtype {quote(dtype)} (only plain, non-quantized dtypes load)"
        )
    return _apply_metadata(_rebuild(storage, storage_offset, size, stride, dtype), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise ValueError("parameter rebuilt from a non-tensor")
    return nn.Parameter(data, requires_grad=bool(requires_grad))


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # Python attributes set on a parameter are not weights: dropped.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _SAFE_REBUILDERS or new_type not in (torch.Tensor, nn.Parameter):
        raise UnsafeCheckpointError(
            f"_rebuild_from_type_v2 with {quote(func)} / {quote(new_type)} is not allowed"
        )
    out = func(*args)
    if new_type is nn.Parameter and not isinstance(out, nn.Parameter):
        out = nn.Parameter(out, requires_grad=False)
    return out


def _torch_size(*args):
    return torch.Size(*args)


def _torch_device(*args):
    if not all(isinstance(a, (str, int)) for a in args):
        raise ValueError(f"torch.device{quote(args)}")
    return torch.device(*args)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1').
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafeCheckpointError(f"_codecs.encode({quote(encoding)}) is not allowed")
    return obj.encode("latin1")


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


MAX_KEY_NODES = 64  # a dict key or set item is an atom or a small tuple of atoms


def _check_hashable(key: Any) -> None:
    """Refuse keys whose hashing would take unbounded time (a doubled nested tuple hashes 2**depth leaves)."""
    pending, seen = [key], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > MAX_KEY_NODES:
            raise ValueError(f"a dict key or set item is a nested tuple of over {MAX_KEY_NODES} elements")
        if isinstance(item, tuple):
            pending.extend(item)
        elif not (item is None or isinstance(item, (str, bytes, int, float, complex, torch.dtype))):
            raise ValueError(f"a dict key or set item is a {type(item).__name__}")


def _plain(cls: type) -> Callable:
    def build(*args):
        if (
            cls in (set, frozenset, list, tuple, bytearray)
            and args
            and not isinstance(args[0], (list, tuple, set, frozenset, bytes, bytearray))
        ):
            # bytearray(2**46) would allocate 64 TiB from a few bytes of pickle.
            raise ValueError(f"{cls.__name__} built from {type(args[0]).__name__}")
        if cls in (set, frozenset) and args:
            for item in args[0]:
                _check_hashable(item)
        if cls is dict and args:
            if len(args) > 1 or not isinstance(args[0], (dict, list, tuple)):
                raise ValueError("dict built from something other than a dict or a list of pairs")
            pairs = args[0].items() if isinstance(args[0], dict) else args[0]
            for pair in pairs:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ValueError("dict built from something other than pairs")
                _check_hashable(pair[0])
        return cls(*args)

    return build


_PLAIN_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex128, torch.complex64,
    *(getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)),
}  # fmt: skip
_SAFE_REBUILDERS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter}

# (module, name) -> the object the unpickler hands back. Callables here are the only things REDUCE may call.
_SAFE_CALLABLES: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): _plain(set),
    ("builtins", "frozenset"): _plain(frozenset),
    ("builtins", "list"): _plain(list),
    ("builtins", "tuple"): _plain(tuple),
    ("builtins", "dict"): _plain(dict),
    ("builtins", "complex"): _plain(complex),
    ("builtins", "slice"): _plain(slice),
    ("builtins", "bytearray"): _plain(bytearray),
}
_SAFE_CALLABLE_IDS = {id(f) for f in _SAFE_CALLABLES.values()}
_SAFE_CLASSES = {("torch._tensor", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): nn.Parameter}
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MODULE_RENAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _describe(obj: Any) -> str:
    if isinstance(obj, type) and issubclass(obj, PickledObject):
        name = f"{obj.pickled_module}.{obj.pickled_name}"
    else:
        name = getattr(obj, "__qualname__", None) or type(obj).__name__
    return name if len(name) <= 200 else name[:197] + "..."


# ---------------------------------------------------------------------------------------------------------------
# The unpickler.


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler whose opcodes that call, construct or mutate objects are restricted."""

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, storages: Callable[[tuple], Any]) -> None:
        super().__init__(file, encoding="utf-8")
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_RENAMES.get(module, module)
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[(module, name)]
        if (module, name) in _SAFE_CLASSES:
            return _SAFE_CLASSES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(name, torch.uint8)
        if module == "torch" and name in _DTYPE_NAMES:
            return _DTYPE_NAMES[name]
        # Anything else: an inert class; the module is not imported.
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._storages(pid)

    # --- opcodes that call something -------------------------------------------------------------------------
    def _call(self, func: Any, args: Any) -> Any:
        if id(func) not in _SAFE_CALLABLE_IDS:
            raise UnsafeCheckpointError(
                f"the pickle calls {_describe(func)}(...), which the safe loader does not allow; it was not called"
            )
        if not isinstance(args, tuple):
            raise ValueError(f"REDUCE arguments are {type(args).__name__}, not a tuple")
        return func(*args)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _new(self, cls: Any, args: Any) -> Any:
        if isinstance(cls, type) and issubclass(cls, PickledObject):
            return _new_placeholder(cls, args)
        raise UnsafeCheckpointError(
            f"the pickle constructs {_describe(cls)} with NEWOBJ, which is not allowed"
        )

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            raise UnsafeCheckpointError(
                f"NEWOBJ_EX with keyword arguments for {_describe(cls)} is not allowed"
            )
        self.append(self._new(cls, args))

    def load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        cls = self.find_class(module, name)
        self.append(self._new(cls, tuple(self.pop_mark())))

    def load_obj(self) -> None:
        args = self.pop_mark()
        cls = args.pop(0)
        self.append(self._new(cls, tuple(args)))

    # --- opcodes that mutate an object ---------------------------------------------------------------------------
    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, PickledObject):
            inst.__dict__["pickled_state"] = state
        elif isinstance(inst, collections.OrderedDict) and isinstance(state, dict):
            # model.state_dict() pickles its `_metadata` attribute this way.
            inst.__dict__.update(
                {k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("__")}
            )
        elif isinstance(inst, torch.Tensor) and not state:
            pass
        else:
            raise UnsafeCheckpointError(
                f"the pickle sets the state of a {type(inst).__name__}, which is not allowed"
            )

    def _target(self, kinds: tuple[type, ...], what: str) -> Any:
        target = self.stack[-1]
        if not isinstance(target, kinds):
            raise UnsafeCheckpointError(f"the pickle {what} a {type(target).__name__}, which is not allowed")
        return target

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        _check_hashable(key)
        self._target((dict,), "sets items of")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target((dict,), "sets items of")
        for i in range(0, len(items), 2):
            _check_hashable(items[i])
            target[items[i]] = items[i + 1]  # dict, OrderedDict or a placeholder: builtin __setitem__

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target((list, PickledObject), "appends to").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list, PickledObject), "appends to").extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target((set,), "adds items to")
        for item in items:
            _check_hashable(item)
        target.update(items)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        for item in items:
            _check_hashable(item)
        self.append(frozenset(items))

    def load_dict(self) -> None:
        items = self.pop_mark()
        for key in items[::2]:
            _check_hashable(key)
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    for _op, _fn in (
        (pickle.FROZENSET, load_frozenset),
        (pickle.DICT, load_dict),
        (pickle.REDUCE, load_reduce),
        (pickle.NEWOBJ, load_newobj),
        (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.INST, load_inst),
        (pickle.OBJ, load_obj),
        (pickle.BUILD, load_build),
        (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems),
        (pickle.APPEND, load_append),
        (pickle.APPENDS, load_appends),
        (pickle.ADDITEMS, load_additems),
    ):
        dispatch[_op[0]] = _fn
    del _op, _fn


def _plain_unpickle(f: Any) -> Any:
    """Unpickle a small header record (no storages allowed)."""

    def no_storages(pid: Any) -> Any:
        raise ValueError("unexpected persistent id in a header record")

    return _RestrictedUnpickler(f, no_storages).load()


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
# Resizing and loading into a model.

# Spatial axis of each row/column bias: ah (1,h,n,H,1), aw (1,h,n,1,W), ha (1,h,H,1,n), wa (1,h,1,W,n).
_BIAS_SPATIAL_AXIS = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


def resize_agent_bias_tables(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Resize the row/column agent biases of a checkpoint to the model's grid (spec §4, official fine-tuning).

    Every ``*.ah_bias``/``aw_bias``/``ha_bias``/``wa_bias`` whose spatial side differs from the model's is
    1-D linearly interpolated (``F.interpolate(mode='linear', align_corners=False)``) along that side; heads and
    agents must match. ``an_bias``/``na_bias`` are always 7×7 and need nothing.

    Returns:
        A new dict; other entries are passed through unchanged.
    """
    target = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        name = key.rsplit(".", 1)[-1]
        if name not in _BIAS_SPATIAL_AXIS or key not in target or value.shape == target[key].shape:
            continue
        axis, want = _BIAS_SPATIAL_AXIS[name], target[key].shape
        if value.dim() != 5 or len(want) != 5:
            continue
        if any(a != b for i, (a, b) in enumerate(zip(value.shape, want, strict=True)) if i != axis):
            continue  # heads/agents differ: left for load_pretrained to report
        moved = value.movedim(axis, -1)
        lead = moved.shape[:-1]
        resized = F.interpolate(
            moved.reshape(1, -1, moved.shape[-1]).float(), size=want[axis], mode="linear", align_corners=False
        )
        out[key] = resized.reshape(*lead, want[axis]).movedim(-1, axis).to(value.dtype).contiguous()
        _logger.info("resized %s from %s to %s", key, tuple(value.shape), tuple(want))
    return out


def _classifier_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if names:
        return [names] if isinstance(names, str) else list(names)
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, module in model.named_modules():
            if module is head and name:
                return [name]
    return []


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"\n  {title} ({len(keys)}): {shown}"


def load_pretrained(
    model: nn.Module,
    checkpoint_path: PathLike,
    filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
    use_ema: bool | None = None,
    strict: bool = True,
) -> None:
    """Load a checkpoint into ``model`` safely (see :func:`load_checkpoint`).

    ``use_ema=None`` follows the model's pretrained tag: ``NAME.in1k_ema`` loads ``state_dict_ema``, so that
    ``timm.create_model("NAME.in1k_ema", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` does.

    ``filter_fn(state_dict, model)`` adapts the official layout (drops re-created buffers, resamples position
    tables and agent biases). A classifier whose shape differs from the model's (another ``num_classes``) is
    dropped, and the model keeps its freshly initialised head. Any other mismatch raises ValueError listing the
    missing, unexpected and mis-shaped keys; with ``strict=False`` they are skipped with a warning.
    """
    if use_ema is None:
        use_ema = str((getattr(model, "pretrained_cfg", None) or {}).get("tag") or "").endswith("ema")
    state = load_checkpoint(checkpoint_path, use_ema=use_ema)
    if filter_fn is not None:
        state = filter_fn(state, model)
    target = model.state_dict()

    reinit, kept = [], []
    heads = _classifier_names(model)
    for head in heads:
        for key in [k for k in state if k == head or k.startswith(head + ".")]:
            if key not in target or state[key].shape != target[key].shape:
                reinit.append(key)
                del state[key]
    if reinit:
        kept = [k for k in target if k not in state and any(k.startswith(h + ".") for h in heads)]
        _logger.warning(
            "%s: classifier shape differs from the model's (num_classes change); dropped %s, re-initialised %s",
            checkpoint_path,
            reinit,
            kept,
        )

    missing = [k for k in target if k not in state and k not in kept]
    unexpected = [k for k in state if k not in target]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or misshaped:
        message = f"{checkpoint_path} does not match {type(model).__name__}:"
        if missing:
            message += _listing("missing", missing)
        if unexpected:
            message += _listing("unexpected", unexpected)
        if misshaped:
            message += _listing("mis-shaped", misshaped)
        if strict:
            raise ValueError(message)
        _logger.warning("%s\n  (strict=False: loading the rest)", message)
        for entry in misshaped:
            del state[entry.split(" ", 1)[0]]
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------------------
# Saving.


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
