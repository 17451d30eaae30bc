"""What a checkpoint file may say about its model, checked before anything is built from it.

A training checkpoint records the model it holds (``model_name``, ``model_kwargs``, ``num_classes``,
``in_chans``, ``img_size``). Those fields are data from a file, never instructions: passed unchecked to
``timm.create_model``, ``pretrained=True, pretrained_cfg_overlay={"url": ...}`` would make timm download a URL to
a path of the file's choosing, and ``checkpoint_path=`` would make it read another file. So:

- the model name must be registered with timm;
- every kwarg must be an architecture argument of that model (a parameter of its model class), and never one
  that names a weight source, a URL, a path or a device (:data:`FORBIDDEN_KWARGS`, :data:`FORBIDDEN_PARTS`);
- values are JSON-like (None, bool, int, float, str, and lists/tuples/dicts of them) of bounded size and depth;
- the model those fields describe is first built on the ``meta`` device (no memory), and must not be larger
  than the weights the file holds: a small file cannot ask for a huge model.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..io import quote

__all__ = [
    "FORBIDDEN_KWARGS",
    "ModelRecord",
    "allowed_model_kwargs",
    "check_json_like",
    "check_model_fits_weights",
    "checked_model_kwargs",
    "checked_model_name",
    "is_forbidden_kwarg",
    "read_model_record",
]

# Never taken from a file, whatever the model accepts: weight sources, hub access, feature wrappers, placement.
FORBIDDEN_KWARGS = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path",
     "cache_dir", "features_only", "feature_cfg", "out_indices", "feature_cls", "scriptable", "exportable",
     "no_jit", "device", "dtype"}
)  # fmt: skip
FORBIDDEN_PARTS = ("pretrained", "url", "file", "dir", "cache", "hub", "checkpoint", "download")


def is_forbidden_kwarg(name: str) -> bool:
    """Whether a kwarg names a weight source, URL, path, hub, feature wrapper or device: never taken from a file."""
    lower = name.lower()
    return (
        name in FORBIDDEN_KWARGS
        or any(part in lower for part in FORBIDDEN_PARTS)
        or lower.endswith(("path", "paths"))  # drop_path_rate is an architecture argument; *_path is not
    )


MAX_DEPTH = 4  # nesting of lists/dicts in one value
MAX_NODES = 256  # values in all of model_kwargs
MAX_STR = 256
MAX_INT = 4096  # dims, depths, heads, agents: larger architecture numbers are refused from a file
INT_LIMITS = {"num_classes": 2**20, "img_size": 4096, "in_chans": 64}
WEIGHT_SLACK_BYTES = 2**20  # buffers recreated at load time may be missing from a file


class ModelRecord(dict):
    """The checked model fields of a checkpoint: ``model_name``, ``model_kwargs``, ``num_classes``,
    ``in_chans``, ``img_size`` (each may be absent in a foreign file)."""


def check_json_like(
    value: Any,
    what: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
    max_str: int = MAX_STR,
    max_int: int | None = MAX_INT,
) -> None:
    """ValueError unless ``value`` is JSON-like (None, bool, int, float, str; list/tuple/dict of them with
    string keys), at most ``max_depth`` deep with ``max_nodes`` values, strings of at most ``max_str``
    characters, ints within ±``max_int`` (the names in :data:`INT_LIMITS` have their own; None: no bound) and
    finite floats. The defaults are those for model kwargs.

    The walk stops at the first violation, so a hostile value (a list doubled 24 times) costs no more than the
    bounds allow.
    """
    pending: list[tuple[Any, int, str]] = [(value, 0, what)]
    nodes = 0
    while pending:
        item, depth, where = pending.pop()
        nodes += 1
        if nodes > max_nodes:
            raise ValueError(f"{what} holds more than {max_nodes} values")
        if depth > max_depth:
            raise ValueError(f"{what} is nested deeper than {max_depth} levels")
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, int):
            limit = INT_LIMITS.get(where.rsplit(".", 1)[-1], max_int)
            if limit is not None and abs(item) > limit:
                raise ValueError(f"{where} = {quote(item, 40)} is out of range (at most {limit})")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{where} = {item!r} is not finite")
        elif isinstance(item, str):
            if len(item) > max_str:
                raise ValueError(f"{where} is a string of {len(item):,} characters (at most {max_str})")
        elif isinstance(item, (list, tuple)):
            if len(item) > max_nodes:
                raise ValueError(f"{where} is a list of {len(item):,} values (at most {max_nodes})")
            pending.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(item))
        elif type(item) is dict:
            if len(item) > max_nodes:
                raise ValueError(f"{where} is a dict of {len(item):,} entries (at most {max_nodes})")
            for key, v in item.items():
                if not isinstance(key, str) or len(key) > max_str:
                    raise ValueError(f"{where} has a key {quote(key, 80)} that is not a short string")
                pending.append((v, depth + 1, f"{where}.{key}"))
        elif isinstance(item, torch.Tensor):  # described by shape, never by its data
            raise ValueError(f"{where} is a tensor of shape {tuple(item.shape)}, not a JSON-like value")
        else:
            raise ValueError(f"{where} is a {type(item).__name__}, not a JSON-like value: {quote(item)}")


def checked_model_name(name: Any, source: str) -> str:
    """``name`` if it is a model registered with timm; ValueError naming ``source`` otherwise."""
    import timm

    import agentattn  # noqa: F401  (registers the agent_* models)

    if not isinstance(name, str) or len(name) > MAX_STR:
        raise ValueError(f"{source}: model_name is {quote(name, 80)}, not a model name")
    if not timm.is_model(name):
        raise ValueError(f"{source}: model_name {quote(name, 80)} is not a registered timm model")
    return name


@functools.cache
def allowed_model_kwargs(name: str) -> frozenset[str]:
    """The architecture arguments of model ``name``: the ``__init__`` parameters of the model classes (those
    taking ``num_classes``) of the module that registers it, less :data:`FORBIDDEN_KWARGS` and any name that
    looks like a weight source, URL or path."""
    from timm.models import model_entrypoint

    module = importlib.import_module(model_entrypoint(name).__module__)
    allowed: set[str] = set()
    for obj in vars(module).values():
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            continue
        params = [
            _init_parameters(cls)
            for cls in obj.__mro__
            if issubclass(cls, nn.Module) and cls is not nn.Module
        ]
        if any("num_classes" in p for p in params):  # a model class (or a subclass of one)
            allowed.update(*params)
    return frozenset(k for k in allowed if not is_forbidden_kwarg(k))


def _init_parameters(cls: type) -> set[str]:
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in signature.parameters.values() if p.kind in kinds and p.name != "self"}


def checked_model_kwargs(name: str, kwargs: Any, source: str) -> dict[str, Any]:
    """``kwargs`` of model ``name`` read from ``source``, checked (see the module doc); ValueError otherwise."""
    if kwargs is None:
        return {}
    if type(kwargs) is not dict:
        raise ValueError(f"{source}: model_kwargs is a {type(kwargs).__name__}, not a dict")
    check_json_like(kwargs, f"{source}: model_kwargs")
    allowed = allowed_model_kwargs(name)
    refused = [k for k in kwargs if k not in allowed]
    if refused:
        never = [k for k in refused if is_forbidden_kwarg(k)]
        why = (
            f"{quote(never, 120)} name weight sources, paths or devices, which are never taken from a file"
            if never
            else f"{quote(refused, 120)} are not architecture arguments of {name}"
        )
        raise ValueError(f"{source}: model_kwargs {why}")
    return dict(kwargs)


def _checked_int(record: Mapping[str, Any], key: str, source: str, low: int) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= INT_LIMITS[key]:
        raise ValueError(f"{source}: {key} is {quote(value, 80)}, not an int in [{low}, {INT_LIMITS[key]}]")
    return value


def read_model_record(record: Mapping[str, Any], source: str) -> ModelRecord:
    """The checked model fields of a training checkpoint's ``record`` (a dict read from ``source``).

    Raises:
        ValueError: a field is missing or malformed (the message names ``source`` and the field).
    """
    if "model_name" not in record:
        raise ValueError(f"{source}: the checkpoint has no model_name")
    name = checked_model_name(record["model_name"], source)
    out = ModelRecord(
        model_name=name, model_kwargs=checked_model_kwargs(name, record.get("model_kwargs"), source)
    )
    for key, low in (("num_classes", 0), ("in_chans", 1), ("img_size", 1)):
        if key not in record:
            raise ValueError(f"{source}: the checkpoint has no {key}")
        out[key] = _checked_int(record, key, source, low)
        if out[key] is None:
            raise ValueError(f"{source}: {key} is None")
    return out


def _state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def check_model_fits_weights(build: Any, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Build the model with ``build()`` on the meta device (no memory) and refuse it when it is larger than the
    ``weights`` read from ``source``, so a small file can never ask for a huge model.

    Raises:
        ValueError: the model would hold more bytes than the file's weights.
    """
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # leaves the caller's RNG as it was
            model = build()
    except Exception as err:  # any failure of a model's constructor on these fields is the file's fault
        raise ValueError(f"{source}: its model fields do not build a model ({quote(str(err), 200)})") from err
    need = _state_bytes(model.state_dict())
    have = _state_bytes(weights)
    if need > have + WEIGHT_SLACK_BYTES:
        raise ValueError(
            f"{source}: its recorded model holds {need:,} bytes, but the file has {have:,} bytes of weights: the "
            "model fields do not match the weights (another architecture, or altered fields)"
        )
