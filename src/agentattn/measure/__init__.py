"""The ground floor for measuring: wall time, FLOPs, peak memory and the environment a figure was taken in.

It imports only torch (and timm's version), so every floor above it, from ``models`` to ``bench``, can use it.
"""

from .environment import command_line, environment
from .flops import FlopCounter, count_flops, count_params
from .memory import peak_kib, reset_peak_kib
from .timing import crossover, median_ms, times_ms

__all__ = [
    "FlopCounter",
    "command_line",
    "count_flops",
    "count_params",
    "crossover",
    "environment",
    "median_ms",
    "peak_kib",
    "reset_peak_kib",
    "times_ms",
]
