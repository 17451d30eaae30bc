"""Small timing helpers: warm-up, then the median of repeated runs within a time budget."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(
    fn: Callable[[], object], warmup: int = 2, min_reps: int = 3, max_reps: int = 30, budget_s: float = 4.0
) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    Runs at least ``min_reps`` and at most ``max_reps`` timed calls, stopping early once ``budget_s`` is spent.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
