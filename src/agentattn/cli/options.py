"""Option values that several commands share, read with errors that name the flag the user typed."""

from __future__ import annotations

import torch

from ..device import resolve_device


def device_option(value: str, local_rank: int | None = None) -> torch.device:
    """``--device VALUE`` as a ``torch.device`` (see :func:`agentattn.device.resolve_device`).

    Raises:
        ValueError: naming ``--device`` and what it accepts.
    """
    try:
        return resolve_device(value, local_rank)
    except ValueError as err:
        raise ValueError(f"--device {value!r}: {err}") from None
