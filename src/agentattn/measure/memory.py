"""The process's peak resident memory, resettable on Linux.

CPU tensors have no allocator statistics, so memory is measured as growth of the peak resident set. Linux resets
the peak (``VmHWM``) to the current resident set when "5" is written to ``/proc/self/clear_refs``, so a peak
reached earlier (imports, model building) does not hide the one being measured.
"""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_kib", "reset_peak_kib"]


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    except OSError:
        pass
    return None


def reset_peak_kib() -> int:
    """Reset the peak resident set to the current one where Linux allows it; return the baseline in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # not-atomic: a kernel control file
        current = _status_kib("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the old peak: a lower bound of the growth


def peak_kib() -> int:
    """The peak resident set of this process in KiB (since start, or since :func:`reset_peak_kib`)."""
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
