"""The tensors of a ``torch.save`` file: the raw bytes of its storages, and the allow-listed functions that
rebuild tensors and parameters from them (our own code, not torch's: nothing named by the file is called).

A rebuilt tensor is a checked view of its storage's bytes; the bytes that views repeat beyond their storages are
capped per file (:data:`MAX_VIEW_EXCESS_BYTES`). The restricted unpickler of :mod:`agentattn.io.unpickle` hands
these functions to the pickle; :mod:`agentattn.io.checkpoint` reads the storages' bytes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .quote import quote

__all__ = ["MAX_VIEW_EXCESS_BYTES"]

# Views may overlap (``expand``ed buffers are saved with stride 0), but a copy of them must not turn a small
# file into a huge tensor: the bytes that views hold beyond their storages are capped per file.
MAX_VIEW_EXCESS_BYTES = 16 * 2**20

_PLAIN_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex128, torch.complex64,
    *(getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)),
}  # fmt: skip


class _ViewBudget:
    """The bytes one file's views hold beyond their storages, refused past :data:`MAX_VIEW_EXCESS_BYTES`."""

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


def _rebuild(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A view of ``storage`` with this layout, checked to lie within it and charged to the file's budget."""
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
    """Set the conj/neg bits that ``metadata`` names on ``tensor``; any other metadata is refused."""
    if metadata:
        # Only the conj/neg bits exist; anything else is not a torch.save file.
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise ValueError(f"unknown tensor metadata {quote(metadata)}")
        torch._utils.set_tensor_metadata(tensor, {k: bool(v) for k, v in metadata.items()})
    return tensor


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """Stands in for ``torch._utils._rebuild_tensor``."""
    return _rebuild(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:  # fmt: skip
    """Stands in for ``torch._utils._rebuild_tensor_v2`` (gradients and hooks are not restored)."""
    return _apply_metadata(_rebuild(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
    dtype: Any, metadata: Any = None,
) -> torch.Tensor:  # fmt: skip
    """Stands in for ``torch._utils._rebuild_tensor_v3``: an untyped storage viewed as a plain dtype."""
    if not isinstance(dtype, torch.dtype) or dtype not in _PLAIN_DTYPES:
        raise ValueError(
            f"_rebuild_tensor_v3 given dtype {quote(dtype)} (only plain, non-quantized dtypes load)"
        )
    return _apply_metadata(_rebuild(storage, storage_offset, size, stride, dtype), metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> nn.Parameter:
    """Stands in for ``torch._utils._rebuild_parameter`` (hooks are not restored)."""
    if not isinstance(data, torch.Tensor):
        raise ValueError("parameter rebuilt from a non-tensor")
    return nn.Parameter(data, requires_grad=bool(requires_grad))


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> nn.Parameter:
    """Stands in for ``torch._utils._rebuild_parameter_with_state``."""
    # Python attributes set on a parameter are not weights: dropped.
    return _rebuild_parameter(data, requires_grad, backward_hooks)
