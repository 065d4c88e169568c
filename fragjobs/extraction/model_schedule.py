"""Prompt-independent caching schedules: model-level (calibrated on many prompts) and uniform.

A prompt's own schedule (:func:`~fragjobs.extraction.caching.plan_block_caching` on its
profile) follows how *its* features settle. Block Caching (Wimbauer et al., CVPR 2024)
calibrates once per model instead: the per-block step changes of many prompts are averaged
and one schedule is planned from the average. :func:`model_level_schedule` does that with the
same planner and budgets as a prompt's own schedule, so the two differ only in the changes
they are planned from. :func:`uniform_schedule` is DeepCache at block granularity: the
shallowest level (``down_blocks.0`` and its mirror up block) every step, every deeper level
every ``interval`` steps.

Schedules are compared at equal *estimated* cost (fraction of the UNet's block time still
spent): :func:`closest_to_cost` picks, among a source's candidates, the one nearest a target.

Example::

    shared = model_level_schedule(profiles_of_other_prompts, target_cost=0.4)
    apply_block_caching(unet, shared)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.caching import (
    BlockCachingConfig,
    CachingSchedule,
    block_levels,
    candidate_schedules,
    plan_block_caching,
)
from fragjobs.keys import check_int
from fragjobs.profiling import PromptProfile


def _check_profiles(profiles: Sequence[PromptProfile]) -> tuple[int, list[str]]:
    """The common step count and block names of ``profiles`` (which must agree)."""
    if not profiles:
        raise InvalidInputError("a model-level schedule needs at least one prompt's profile")
    steps = profiles[0].config.steps
    blocks = sorted(profiles[0].block_change)
    if not blocks:
        raise InvalidInputError(f"profile of {profiles[0].prompt!r} recorded no block changes")
    for profile in profiles[1:]:
        if profile.config.steps != steps or sorted(profile.block_change) != blocks:
            raise InvalidInputError(
                f"profiles disagree: {profile.prompt!r} has {profile.config.steps} steps and "
                f"blocks {sorted(profile.block_change)}, {profiles[0].prompt!r} has {steps} and "
                f"{blocks}; profile every prompt on the same model with the same steps"
            )
    return steps, blocks


def mean_block_change(profiles: Sequence[PromptProfile]) -> dict[str, list[float]]:
    """Per block, the step changes averaged over ``profiles`` (each a mean over its seeds).

    Raises:
        InvalidInputError: no profile, or profiles of different steps or blocks.
    """
    _, blocks = _check_profiles(profiles)
    changes = [p.mean_block_change() for p in profiles]
    return {
        block: [
            round(sum(c) / len(changes), 6)
            for c in zip(*(ch[block] for ch in changes), strict=True)
        ]
        for block in blocks
    }


def mean_block_time_ms(profiles: Sequence[PromptProfile]) -> dict[str, float]:
    """Per block, its profiled time averaged over the ``profiles`` that timed it."""
    _check_profiles(profiles)
    times: dict[str, list[float]] = {}
    for profile in profiles:
        for block, ms in profile.layer_time_ms.items():
            times.setdefault(block, []).append(ms)
    return {block: sum(v) / len(v) for block, v in sorted(times.items())}


def closest_to_cost(schedules: Sequence[CachingSchedule], target_cost: float) -> CachingSchedule:
    """The schedule whose estimated cost is nearest ``target_cost`` (the cheaper on a tie).

    Raises:
        InvalidInputError: no schedule, or ``target_cost`` not in (0, 1].
    """
    if isinstance(target_cost, bool) or not isinstance(target_cost, int | float):
        raise InvalidInputError(f"target_cost must be a number in (0, 1], got {target_cost!r}")
    if not 0 < target_cost <= 1:
        raise InvalidInputError(f"target_cost must be in (0, 1], got {target_cost!r}")
    if not schedules:
        raise InvalidInputError("no candidate schedule to choose from")
    return min(schedules, key=lambda s: (abs(s.estimated_cost - target_cost), s.estimated_cost))


def model_level_candidates(
    profiles: Sequence[PromptProfile],
    config: BlockCachingConfig | None = None,
    *,
    block_time_ms: Mapping[str, float] | None = None,
) -> list[CachingSchedule]:
    """Every schedule of ``config``'s budgets planned from the prompts' averaged block changes.

    Args:
        profiles: profiles of the calibration prompts (same model, same steps).
        config: the budgets (default :class:`BlockCachingConfig`).
        block_time_ms: block times for the cost estimate; default the profiles' mean.

    Returns:
        The candidates, cheapest (estimated) first, as :func:`candidate_schedules` gives them.
    """
    steps, _ = _check_profiles(profiles)
    times = dict(block_time_ms) if block_time_ms is not None else mean_block_time_ms(profiles)
    return candidate_schedules(
        mean_block_change(profiles), times, steps, config or BlockCachingConfig()
    )


def model_level_schedule(
    profiles: Sequence[PromptProfile],
    target_cost: float,
    config: BlockCachingConfig | None = None,
    *,
    block_time_ms: Mapping[str, float] | None = None,
) -> CachingSchedule:
    """One schedule for the whole model: planned from many prompts' averaged block changes,
    the candidate whose estimated cost is nearest ``target_cost``.

    Raises:
        InvalidInputError: see :func:`mean_block_change` and :func:`closest_to_cost`.
    """
    return closest_to_cost(
        model_level_candidates(profiles, config, block_time_ms=block_time_ms), target_cost
    )


def uniform_schedule(
    block_time_ms: Mapping[str, float], steps: int, interval: int
) -> CachingSchedule:
    """DeepCache at block granularity: the shallowest level every step, every deeper level
    at steps ``0, interval, 2 * interval, …``.

    Planned by :func:`plan_block_caching` (so its cost is estimated the same way) from a
    constant change per step scaled to each level's budget; the schedule's ``delta`` is that
    synthetic budget (``interval - 0.5``), not a profiled one.

    Args:
        block_time_ms: every UNet block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``)
            with its time.
        steps: inference steps.
        interval: deep levels are recomputed every ``interval`` steps (1: every step).

    Raises:
        InvalidInputError: bad block names, ``steps`` or ``interval``.
    """
    check_int(steps, "steps", minimum=2, maximum=1000)
    check_int(interval, "interval", minimum=1, maximum=steps)
    levels = block_levels(dict(block_time_ms))
    # level l's budget is delta * 2**(l-1): a change of 2**(l-1) per step reaches it after
    # `interval` steps at every level
    change = {b: [float(2 ** max(lv - 1, 0))] * (steps - 1) for b, lv in levels.items()}
    return plan_block_caching(
        change, dict(block_time_ms), steps, interval - 0.5, shallow_delta=None, warmup_steps=1
    )


def uniform_candidates(block_time_ms: Mapping[str, float], steps: int) -> list[CachingSchedule]:
    """:func:`uniform_schedule` for every interval from 2 to ``steps``, cheapest first (the
    shorter interval first among equal costs)."""
    schedules = [uniform_schedule(block_time_ms, steps, n) for n in range(2, steps + 1)]
    return sorted(schedules, key=lambda s: s.estimated_cost)
