"""A dynamic-routing schedule: what the hooks of :mod:`fragjobs.extraction.routing_hooks` do.

Planned and searched in :mod:`fragjobs.extraction.caching` and
:mod:`fragjobs.extraction.caching_search`, recorded in the manifest's ``dynamic_routing``
layer. The optional parts default to "off", so a schedule read from an older manifest
behaves as before: blocks reuse their last output, both CFG halves always run, no probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fragjobs.families import first_block


@dataclass(frozen=True)
class CachingSchedule:
    """For ``steps`` inference steps: the steps at which each block is recomputed.

    Args:
        forecast_orders: per block, the order of the extrapolation of its skipped outputs
            (0 or absent: its last output is reused; 1, 2: see
            :mod:`fragjobs.extraction.forecast`).
        cfg_steps: steps on which only the conditional half of the CFG batch runs and the
            unconditional output is rebuilt from the last computed guidance difference.
        probe_change: the profiled mean relative change of the first block's output at
            each step (``steps - 1`` values); empty: no run-time probe.
        probe_margin: the probe forces every block to recompute when a sample's change of
            the first block (:meth:`probe_block`) accumulated since the last full step exceeds
            ``probe_margin`` × the profiled change over the same steps.
    """

    steps: int
    recompute: dict[str, tuple[int, ...]]
    delta: float
    estimated_cost: float  # fraction of block time still spent, from profiled block times
    block_time_ms: dict[str, float] = field(default_factory=dict)
    shallow_delta: float | None = None
    warmup_steps: int = 1
    forecast_orders: dict[str, int] = field(default_factory=dict)
    cfg_steps: tuple[int, ...] = ()
    probe_change: tuple[float, ...] = ()
    probe_margin: float | None = None

    def probe_block(self) -> str:
        """The block the run-time probe watches: the first the denoiser runs."""
        return first_block(self.recompute)

    def skipped_fraction(self) -> float:
        """Fraction of block evaluations skipped (unweighted)."""
        total = self.steps * len(self.recompute)
        return 1 - sum(len(s) for s in self.recompute.values()) / total if total else 0.0

    def full_steps(self) -> frozenset[int]:
        """The steps at which every block is recomputed."""
        sets = [set(s) for s in self.recompute.values()]
        return frozenset(set.intersection(*sets)) if sets else frozenset(range(self.steps))


def routed_cost(schedule: CachingSchedule) -> float:
    """Estimated fraction of the UNet's block time spent, with CFG reuse and the probe.

    A block computed on a CFG-reuse step runs on half the batch (half the time); the probe
    computes the first block on every step.
    """
    times, steps = schedule.block_time_ms, schedule.steps
    probe = schedule.probe_block() if schedule.probe_change else None
    cfg = set(schedule.cfg_steps)
    total = sum(times.get(b, 1.0) for b in schedule.recompute) or 1.0
    spent = 0.0
    for block, recompute in schedule.recompute.items():
        run = set(range(steps)) if block == probe else recompute
        spent += times.get(block, 1.0) * sum(0.5 if t in cfg else 1.0 for t in run) / steps
    return round(spent / total, 6)
