"""A restricted unpickler for ``torch.save`` files: reads tensors and plain containers, runs nothing.

Official Agent-Attention checkpoints are ``torch.save`` dicts holding ``model``, ``optimizer``, ``lr_scheduler``,
``epoch`` and a pickled yacs ``CfgNode`` config. ``torch.load(weights_only=True)`` refuses them (the CfgNode is
not allow-listed) and ``weights_only=False`` runs whatever the pickle says. The unpickler here:

- loads tensors, ``OrderedDict``, ``torch.Size``/``device``/dtypes and plain builtin containers;
- turns any other class named by the pickle into an inert placeholder (a ``dict`` subclass keeping the items,
  constructor arguments and state that the pickle gives it); its module is never imported;
- raises :class:`UnsafeCheckpointError` on a call to anything that is not allow-listed (``os.system``,
  ``builtins.eval``, a placeholder class, ...); nothing named by the file is ever called unless allow-listed.

The file formats around it (zip archive, legacy pickle) are read in :mod:`agentattn.io.checkpoint`; the
storages and the allow-listed functions that rebuild tensors from them are :mod:`agentattn.io.storages`.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .quote import quote
from .storages import (
    _rebuild_parameter,
    _rebuild_parameter_with_state,
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
)

__all__ = ["PickledObject", "UnsafeCheckpointError"]


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
# Storage types and the allow-listed callables (our own code, not torch's: nothing from the file is called).


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
