"""Checks of records read back from files (training and dense checkpoints), and of what a run directory holds.

Every field a run reads from a file is checked here before it is used: a wrong type, shape or range gives one
``ValueError`` line naming the file and the field (``optimizer.state[3].exp_avg``), quoting at most ~200
characters of the value (:func:`agentattn.io.quote`), never a traceback from deep inside torch.

What a new run may do with a directory that already holds results (:func:`prepare_output`,
:func:`remove_results`, :func:`results_in`) lives in :mod:`.existing_results`; it is re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import quote
from ..models.record import check_json_like, is_forbidden_kwarg
from .existing_results import prepare_output, remove_results, results_in

__all__ = [
    "check_architecture_kwargs",
    "check_bool",
    "check_dataclass_values",
    "check_dict",
    "check_int",
    "check_list",
    "check_number",
    "check_optimizer_state",
    "check_plain",
    "check_rng_state",
    "check_scheduler_state",
    "check_state_dict",
    "check_str",
    "describe",
    "get_field",
    "load_state_dict_checked",
    "prepare_output",
    "remove_results",
    "results_in",
]

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------
# Values read from a file


def describe(value: Any) -> str:
    """A short quote of ``value`` for an error message (tensors by shape and dtype, never their data)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    return quote(value)


def _bad(path: PathLike, name: str, want: str, value: Any) -> ValueError:
    return ValueError(f"{path}: field {name} must be {want}, got {describe(value)}")


def get_field(path: PathLike, record: Mapping[str, Any], key: str, name: str | None = None) -> Any:
    """``record[key]``, or a ValueError naming the file and the missing field."""
    if not isinstance(record, Mapping):
        raise ValueError(
            f"{path}: holds {describe(record)} where a dict with the field {name or key} belongs"
        )
    if key not in record:
        raise ValueError(f"{path}: field {name or key} is missing")
    return record[key]


def check_int(path: PathLike, name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(path, name, _range("an int", lo, hi), value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(path, name, _range("an int", lo, hi), value)
    return int(value)


def check_number(
    path: PathLike,
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    finite: bool = True,
) -> float:
    """A real number (int or float, not a bool), finite unless ``finite=False``, in [lo, hi]."""
    want = _range("a finite number" if finite else "a number", lo, hi)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(path, name, want, value)
    if finite and not math.isfinite(value):
        raise _bad(path, name, want, value)
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):
        raise _bad(path, name, want, value)
    return float(value)


def _range(what: str, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{what} in [{lo}, {hi}]"
    if lo is not None:
        return f"{what} >= {lo}"
    if hi is not None:
        return f"{what} <= {hi}"
    return what


def check_bool(path: PathLike, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(path, name, "true or false", value)
    return value


def check_str(path: PathLike, name: str, value: Any, max_len: int = 1000) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise _bad(path, name, f"a string of at most {max_len} characters", value)
    return value


def check_dict(path: PathLike, name: str, value: Any) -> dict[str, Any]:
    """A dict with string keys."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(path, name, "a dict with string keys", value)
    return dict(value)


def check_list(path: PathLike, name: str, value: Any, length: int | None = None) -> list[Any]:
    """A list or tuple (of ``length`` items when given)."""
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        want = "a list" if length is None else f"a list of {length} items"
        raise _bad(path, name, want, value)
    return list(value)


_PLAIN_SCALARS = (type(None), bool, int, float, str)


def check_plain(path: PathLike, name: str, value: Any, depth: int = 6, max_items: int = 10_000) -> Any:
    """A value made of None, bools, numbers, strings, lists, tuples and string-keyed dicts only (what a config
    holds), nested at most ``depth`` deep, with at most ``max_items`` items in all (see
    :func:`agentattn.models.record.check_json_like`)."""
    try:
        check_json_like(value, name, max_depth=depth, max_nodes=max_items, max_str=10_000, max_int=None)
    except ValueError as err:
        raise ValueError(
            f"{path}: field {name} must be plain values (numbers, strings, lists, dicts): {err}"
        ) from None
    return value


def check_dataclass_values(path: PathLike, name: str, values: Any, cls: type) -> dict[str, Any]:
    """The items of ``values`` that are fields of the dataclass ``cls``, each checked against the field's type
    annotation (``int``, ``float | None``, ``dict[str, Any]``, ``Any``, ...); other items are dropped."""
    values = check_dict(path, name, values)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            out[f.name] = _check_annotated(path, f"{name}.{f.name}", values[f.name], str(f.type))
    return out


def _check_annotated(path: PathLike, name: str, value: Any, annotation: str) -> Any:
    options = [a.strip() for a in annotation.split("|")]
    if "None" in options and value is None:
        return None
    kinds = [a.split("[", 1)[0] for a in options if a != "None"]
    checks = {
        "int": lambda: check_int(path, name, value),
        "float": lambda: check_number(path, name, value),
        "bool": lambda: check_bool(path, name, value),
        "str": lambda: check_str(path, name, value),
        "dict": lambda: check_plain(path, name, check_dict(path, name, value)),
        "list": lambda: check_plain(path, name, check_list(path, name, value)),
        "tuple": lambda: check_plain(path, name, tuple(check_list(path, name, value))),
    }
    errors = []
    for kind in kinds:
        check = checks.get(kind, lambda: check_plain(path, name, value))
        try:
            return check()
        except ValueError as err:
            errors.append(err)
    if len(options) == 1 and errors:
        raise errors[0]
    raise _bad(path, name, f"of type {' or '.join(options)}", value)


def check_architecture_kwargs(path: PathLike, name: str, value: Any) -> dict[str, Any]:
    """Model constructor kwargs read from a file: a string-keyed dict of plain values, none of which names a weight
    source, a URL, a path or a device (``checkpoint_path``, ``pretrained_cfg_overlay``, ``cache_dir`` ...): a
    file never makes the program open another file or the network."""
    value = check_plain(path, name, check_dict(path, name, value))
    for key in value:
        if is_forbidden_kwarg(key):
            raise ValueError(
                f"{path}: field {name}.{quote(key, 60)[1:-1]} is not an architecture argument (it names a weight "
                "source, a path or a device; a file never sets those)"
            )
    return value


# ---------------------------------------------------------------------------------------------------------------
# Tensors, state dicts, optimizer and scheduler states


def _is_plain_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_meta


def check_state_dict(path: PathLike, name: str, value: Any) -> dict[str, torch.Tensor]:
    """A state dict: string keys, tensor values."""
    if not isinstance(value, Mapping):
        raise _bad(path, name, "a state dict (names to tensors)", value)
    for key, tensor in value.items():
        if not isinstance(key, str):
            raise _bad(path, name, "a state dict with string keys", key)
        if not _is_plain_tensor(tensor):
            raise _bad(path, f"{name}[{quote(key, 80)}]", "a tensor", tensor)
    return value  # type: ignore[return-value]


def load_state_dict_checked(path: PathLike, name: str, module: nn.Module, state: Any) -> None:
    """``module.load_state_dict(state)`` after :func:`check_state_dict`; a mismatch is a one-line ValueError."""
    check_state_dict(path, name, state)
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        first = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        raise ValueError(f"{path}: field {name} does not fit this model ({quote(first, 240)[1:-1]})") from err


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def check_optimizer_state(path: PathLike, name: str, value: Any, optimizer: torch.optim.Optimizer) -> dict:
    """An AdamW ``state_dict`` that fits ``optimizer``: as many param groups with as many parameters each, group
    options of the right types, and per-parameter states whose tensors have their parameters' shapes."""
    value = check_dict(path, name, value)
    for key in value:
        if key not in ("state", "param_groups"):
            raise _bad(path, name, "a dict with the keys 'state' and 'param_groups'", list(value))
    groups = check_list(
        path, f"{name}.param_groups", get_field(path, value, "param_groups", f"{name}.param_groups")
    )
    state = get_field(path, value, "state", f"{name}.state")
    if not isinstance(state, Mapping):
        raise _bad(path, f"{name}.state", "a dict", state)
    current = optimizer.param_groups
    if len(groups) != len(current):
        raise _bad(path, f"{name}.param_groups", f"a list of {len(current)} groups", groups)
    params: dict[int, torch.Tensor] = {}
    amsgrad: dict[int, bool] = {}
    for i, (group, ours) in enumerate(zip(groups, current, strict=True)):
        gname = f"{name}.param_groups[{i}]"
        group = check_dict(path, gname, group)
        ids = check_list(path, f"{gname}.params", get_field(path, group, "params", f"{gname}.params"))
        if len(ids) != len(ours["params"]):
            raise _bad(path, f"{gname}.params", f"a list of {len(ours['params'])} parameter ids", ids)
        for pid, param in zip(ids, ours["params"], strict=True):
            check_int(path, f"{gname}.params", pid, 0)
            if pid in params:
                raise _bad(path, f"{gname}.params", "distinct parameter ids", pid)
            params[pid], amsgrad[pid] = param, bool(group.get("amsgrad", False))
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in ours:
                get_field(path, group, key, f"{gname}.{key}")
        for key, saved in group.items():
            if key != "params":
                _check_group_option(path, f"{gname}.{key}", saved, ours.get(key, _MISSING))
    for pid, entry in state.items():
        sname = f"{name}.state[{quote(pid, 40)}]"
        if pid not in params:
            raise ValueError(f"{path}: field {sname} names no parameter of the param groups")
        entry = check_dict(path, sname, entry)
        if not entry:
            continue
        wanted = set(_ADAM_STATE) | ({"max_exp_avg_sq"} if amsgrad[pid] else set())
        for key in wanted - set(entry):
            raise ValueError(f"{path}: field {sname}.{key} is missing")
        for key in set(entry) - wanted:
            raise ValueError(f"{path}: field {sname}.{key} is not an AdamW state")
        step = entry["step"]
        if not (_is_plain_tensor(step) and step.numel() == 1 and step.is_floating_point()):
            raise _bad(path, f"{sname}.step", "a one-element float tensor", step)
        if not (math.isfinite(float(step)) and float(step) >= 0):
            raise _bad(path, f"{sname}.step", "a finite number >= 0", float(step))
        shape = params[pid].shape
        for key in sorted(wanted - {"step"}):
            tensor = entry[key]
            if not (_is_plain_tensor(tensor) and tensor.is_floating_point() and tensor.shape == shape):
                raise _bad(path, f"{sname}.{key}", f"a float tensor of shape {list(shape)}", tensor)
    return value


_MISSING = object()


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _check_group_option(path: PathLike, name: str, saved: Any, ours: Any) -> None:
    """One option of a param group: the kind of our own value (None may also be a bool: foreach, fused)."""
    if ours is _MISSING:  # an option of another torch version: plain scalars only
        if not isinstance(saved, _PLAIN_SCALARS) or (isinstance(saved, str) and len(saved) > 200):
            raise _bad(path, name, "a plain value", saved)
        return
    kind = _kind(ours)
    if kind == "None":
        if saved is not None and not isinstance(saved, bool):
            raise _bad(path, name, "None or a bool", saved)
    elif kind == "bool":
        check_bool(path, name, saved)
    elif kind == "number":
        check_number(path, name, saved, 0)
    elif kind == "list":
        items = check_list(path, name, saved, len(ours))
        if not all(isinstance(x, str) for x in ours):
            for j, x in enumerate(items):
                check_number(path, f"{name}[{j}]", x)
        else:
            for j, x in enumerate(items):
                check_str(path, f"{name}[{j}]", x)
    elif kind == "str":
        check_str(path, name, saved, 200)
    elif not isinstance(saved, type(ours)):
        raise _bad(path, name, f"a {type(ours).__name__}", saved)


def check_scheduler_state(path: PathLike, name: str, value: Any, ours: Mapping[str, Any]) -> dict:
    """A scheduler ``state_dict`` with the keys of our own (``ours``), each value of the same kind: numbers
    finite, lists as long, strings equal (they name fields: ``param_group_field``)."""
    value = check_dict(path, name, value)
    if set(value) != set(ours):
        missing, extra = sorted(set(ours) - set(value)), sorted(set(value) - set(ours))
        what = "; ".join(
            x for x in (f"missing {missing}" if missing else "", f"unknown {extra}" if extra else "") if x
        )
        raise ValueError(f"{path}: field {name} does not have this scheduler's keys ({quote(what)[1:-1]})")
    for key, mine in ours.items():
        saved, kname = value[key], f"{name}.{key}"
        kind = _kind(mine)
        if kind == "None":
            if saved is not None:
                raise _bad(path, kname, "None", saved)
        elif kind == "bool":
            check_bool(path, kname, saved)
        elif kind == "number":
            if isinstance(mine, int):
                check_int(path, kname, saved)
            else:
                check_number(path, kname, saved)
        elif kind == "str":
            if saved != mine:
                raise _bad(path, kname, repr(mine), saved)
        elif kind == "list":
            items = check_list(path, kname, saved, len(mine))
            for j, x in enumerate(items):
                check_number(path, f"{kname}[{j}]", x)
        else:
            raise _bad(path, kname, f"a {type(mine).__name__}", saved)
    return value


def check_rng_state(path: PathLike, name: str, value: Any) -> dict[str, Any]:
    """The RNG states ``agentattn train`` saves (python, numpy, torch, optional cuda), each tried on a throw-away
    generator, so that setting them later cannot fail."""
    value = check_dict(path, name, value)
    python = check_list(path, f"{name}.python", get_field(path, value, "python", f"{name}.python"), 3)
    internal = check_list(path, f"{name}.python[1]", python[1])
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in internal):
        raise _bad(path, f"{name}.python[1]", "a list of ints", internal)
    try:
        random.Random().setstate((python[0], tuple(internal), python[2]))
    except (TypeError, ValueError, OverflowError) as err:
        raise _bad(path, f"{name}.python", f"a state of Python's random module ({err})", python) from err

    numpy_state = check_list(path, f"{name}.numpy", get_field(path, value, "numpy", f"{name}.numpy"), 5)
    algo, keys, pos, has_gauss, cached = numpy_state
    if algo != "MT19937":
        raise _bad(path, f"{name}.numpy[0]", "'MT19937'", algo)
    if not (
        _is_plain_tensor(keys)
        and keys.shape == (624,)
        and not keys.is_floating_point()
        and keys.dtype != torch.bool
    ):
        raise _bad(path, f"{name}.numpy[1]", "an int tensor of shape [624]", keys)
    if int(keys.min()) < 0 or int(keys.max()) >= 2**32:
        raise _bad(path, f"{name}.numpy[1]", "ints in [0, 2**32)", keys)
    check_int(path, f"{name}.numpy[2]", pos, 0, 624)
    check_int(path, f"{name}.numpy[3]", has_gauss, 0, 1)
    check_number(path, f"{name}.numpy[4]", cached)
    try:
        np.random.RandomState().set_state((algo, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError) as err:
        raise _bad(path, f"{name}.numpy", f"a numpy RNG state ({err})", numpy_state) from err

    cpu = get_field(path, value, "torch", f"{name}.torch")
    want = torch.get_rng_state()
    if not (_is_plain_tensor(cpu) and cpu.dtype == torch.uint8 and cpu.shape == want.shape):
        raise _bad(path, f"{name}.torch", f"a uint8 tensor of shape {list(want.shape)}", cpu)
    try:
        torch.Generator().set_state(cpu)
    except RuntimeError as err:
        raise _bad(path, f"{name}.torch", f"a torch RNG state ({err})", cpu) from err

    if "cuda" in value:
        states = check_list(path, f"{name}.cuda", value["cuda"])
        for i, state in enumerate(states):
            if not (_is_plain_tensor(state) and state.dtype == torch.uint8 and state.dim() == 1):
                raise _bad(path, f"{name}.cuda[{i}]", "a uint8 tensor", state)
        if torch.cuda.is_available():
            if len(states) > torch.cuda.device_count():
                raise _bad(path, f"{name}.cuda", f"at most {torch.cuda.device_count()} states", states)
            for i, state in enumerate(states):
                mine = torch.cuda.get_rng_state(i)
                if state.shape != mine.shape:
                    raise _bad(
                        path, f"{name}.cuda[{i}]", f"a uint8 tensor of shape {list(mine.shape)}", state
                    )
    for key in set(value) - {"python", "numpy", "torch", "cuda"}:
        raise ValueError(
            f"{path}: field {name}.{quote(key, 40)[1:-1]} is not an RNG state this program saves"
        )
    return value
