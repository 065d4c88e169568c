"""Timing helpers the benchmarks share: repeated wall-clock samples and their median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(samples: list[float]) -> float:
    """The median of ``samples`` (seconds), in milliseconds rounded to the microsecond."""
    return round(statistics.median(samples) * 1000, 3)


def timed(
    call: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None
) -> list[float]:
    """Seconds each of ``repeats`` calls of ``call`` took; ``before`` runs untimed before each."""
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples
