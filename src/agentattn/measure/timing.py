"""Wall-clock timing: warm-up calls, then repeated calls within a time budget; and where one curve crosses
another."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable


def times_ms(
    fn: Callable[[], object],
    warmup: int = 2,
    min_reps: int = 3,
    max_reps: int = 30,
    budget_s: float = 4.0,
    slow_call_s: float | None = None,
) -> list[float]:
    """Wall times of ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    Runs at least ``min_reps`` and at most ``max_reps`` timed calls, stopping once ``budget_s`` is spent. With
    ``slow_call_s``, one call that took longer than that is enough (a size too slow to repeat).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        enough = len(times) >= min_reps or (slow_call_s is not None and times[0] > slow_call_s * 1e3)
        if enough and time.perf_counter() - start >= budget_s:
            break
    return times


def median_ms(
    fn: Callable[[], object], warmup: int = 2, min_reps: int = 3, max_reps: int = 30, budget_s: float = 4.0
) -> float:
    """Median of :func:`times_ms` (same arguments)."""
    return statistics.median(times_ms(fn, warmup, min_reps, max_reps, budget_s))


def crossover(points: Iterable[tuple[float, float, float]]) -> float | None:
    """The smallest size where a candidate's time drops to a baseline's or below, log-log interpolated.

    Args:
        points: ``(size, candidate_ms, baseline_ms)`` in increasing size.

    Returns:
        The first size if the candidate is already no slower there, the interpolated size of the first crossing,
        or None if the candidate is slower at every size.
    """
    prev: tuple[float, float] | None = None
    for size, candidate, baseline in points:
        gap = math.log(candidate) - math.log(baseline)  # > 0: the candidate is slower
        if gap <= 0:
            if prev is None:
                return float(size)
            (s0, g0), s1 = prev, size
            frac = g0 / (g0 - gap)
            return float(math.exp(math.log(s0) + frac * (math.log(s1) - math.log(s0))))
        prev = (size, gap)
    return None


__all__ = ["crossover", "median_ms", "times_ms"]
