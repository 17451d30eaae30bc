"""Device names, resolved once for every command and library entry point (training, eval, dense, the LM)."""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` that ``name`` asks for.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or another device
            type torch knows (``"mps"``, ``"xpu"``).
        local_rank: the GPU that ``"auto"`` and ``"cuda"`` mean; by default this process's rank on its machine
            (``LOCAL_RANK``, set by torchrun), else 0.

    Raises:
        ValueError: ``name`` is not a device, or it names CUDA on a machine without it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine; use device 'cpu'")
    if name == "cuda":
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        )
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}") from err
