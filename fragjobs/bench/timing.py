"""Timing helpers the benchmarks share: repeated wall-clock samples, their median and spread."""

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


SPREAD_LIMIT = 1.25
"""A timing row is flagged ``spread_wide`` when its slowest repeat took more than this many
times its fastest (the machine's load changed under it: compare its median with care)."""


def spread(samples_ms: list[float], limit: float = SPREAD_LIMIT) -> dict[str, Any]:
    """Min / median / max of repeated per-image latencies (ms) and the wide-spread flag.

    Returns:
        ``{"latency_ms": median, "latency_min_ms", "latency_max_ms", "spread_wide"}``;
        ``spread_wide`` is ``max / min > limit``.

    Raises:
        ValueError: no samples, or a sample that is not > 0.
    """
    if not samples_ms or min(samples_ms) <= 0:
        raise ValueError(f"latency samples must be > 0 ms, got {samples_ms!r}")
    low, high = min(samples_ms), max(samples_ms)
    return {
        "latency_ms": round(statistics.median(samples_ms), 2),
        "latency_min_ms": round(low, 2),
        "latency_max_ms": round(high, 2),
        "spread_wide": high / low > limit,
    }


def time_interleaved(rows, runners, prompt: str, gen: Any, repeats: int) -> None:
    """Warm per-image latency of each row's method, timed in interleaved rounds.

    Every method first runs one untimed warm-up batch (its CUDA max allocated, MiB, is
    recorded on a GPU); then ``repeats`` rounds time one batch of each method in turn, the
    order rotating each round, so drifts of a shared machine hit every method alike. Each row
    gets the median, min and max of its repeats and ``spread_wide`` (:func:`spread`).
    """
    import torch

    from fragjobs.generation import batch_latency_ms, generate_images

    seeds = list(range(gen.batch_size))
    timings: dict[str, list[float]] = {row["method"]: [] for row in rows}
    for row in rows:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with runners[row["method"]]() as pipe:
            generate_images(pipe, prompt, seeds, gen)
        row["cuda_peak_mib"] = (
            round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if torch.cuda.is_available()
            else None
        )
    names = list(timings)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            with runners[name]() as pipe:
                timings[name].append(batch_latency_ms(pipe, prompt, seeds, gen))
    for row in rows:
        row.update(spread(timings[row["method"]]))
