"""Block caching, the fragment's dynamic routing: its search, and its public names.

The schedule and its planning are :mod:`fragjobs.extraction.caching_plan`, the hooks that
carry it out :mod:`fragjobs.extraction.routing_hooks`, forecasting
:mod:`fragjobs.extraction.forecast`; this module searches a prompt's routing against the
full model's images and re-exports the public names.

:func:`search_block_caching` bisects the block-caching candidates (sorted by estimated
cost). Each candidate is tried with
the switches of its config on: the forecast orders of least error measured so far, the CFG
steps planned from the guidance difference measured in the first trial, the probe calibrated
on the profiling seeds. A trial stops at the first profiling seed below ``min_ssim`` (the
worst seed decides anyway): the seed that was worst so far is generated first, alone, and
the others in one batch only when it passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from fragjobs.extraction.caching_plan import (
    BlockCachingConfig,
    block_levels,
    caching_schedule,
    calibrate_probe,
    candidate_schedules,
    plan_block_caching,
    plan_cfg_steps,
    routing_layer,
)
from fragjobs.extraction.fidelity import profiling_generation, reference_images, seed_ssim_until
from fragjobs.extraction.forecast import ForecastErrors
from fragjobs.extraction.routing_hooks import (
    apply_block_caching,
    remove_block_caching,
    reset_block_caching,
)
from fragjobs.extraction.schedule import CachingSchedule, routed_cost
from fragjobs.families import first_block, level_output_blocks
from fragjobs.profiling import PromptProfile

__all__ = [
    "BlockCachingConfig",
    "CachingSchedule",
    "apply_block_caching",
    "block_levels",
    "caching_schedule",
    "candidate_schedules",
    "plan_block_caching",
    "remove_block_caching",
    "reset_block_caching",
    "routing_layer",
    "search_block_caching",
]

FIRST_ORDER = 0  # until errors are measured, up blocks reuse (a forecast must earn its place)


class _Routing:
    """The switches' state across a search's trials."""

    def __init__(self, profile: PromptProfile, config: BlockCachingConfig) -> None:
        self.profile, self.config = profile, config
        self.outputs = level_output_blocks(profile.block_change)
        self.errors = ForecastErrors()
        self.orders = dict.fromkeys(self.outputs, FIRST_ORDER) if config.forecast else {}
        self.guidance: dict[int, float] | None = None

    def route(self, schedule: CachingSchedule) -> CachingSchedule:
        """``schedule`` with the switched-on parts as known now."""
        routed = replace(schedule, forecast_orders=dict(self.orders))
        if self.config.cfg_reuse and self.guidance:
            steps = plan_cfg_steps(
                self.guidance, schedule.steps, schedule.delta, schedule.warmup_steps
            )
            routed = replace(routed, cfg_steps=steps)
        probe = self.profile.block_change.get(first_block(self.profile.block_change))
        if self.config.probe and probe is not None and probe.shape[1] == schedule.steps - 1:
            change, margin = calibrate_probe(probe, routed.full_steps())
            routed = replace(routed, probe_change=change, probe_margin=margin)
        return replace(routed, estimated_cost=routed_cost(routed))

    def learn(self, state: Any) -> None:
        """Update the orders from all errors so far; keep the first guidance measurement."""
        if self.config.forecast:
            self.orders = self.errors.best_orders(self.outputs, FIRST_ORDER)
        if self.guidance is None:
            self.guidance = state.mean_guidance_change()


@torch.no_grad()
def search_block_caching(
    pipe: Any,
    unet: torch.nn.Module,
    profile: PromptProfile,
    config: BlockCachingConfig,
    *,
    height: int,
    width: int,
    reference: torch.Tensor | None = None,
    candidates: Sequence[CachingSchedule] | None = None,
) -> tuple[CachingSchedule | None, list[dict[str, float | None]]]:
    """The fastest routing whose images keep ``config.min_ssim`` against the full model.

    The candidates (every budget pair, sorted by the cost estimated from profiled block
    times) are bisected: a candidate passes when the worst profiling seed keeps
    ``config.min_ssim``. A pass rules out every costlier candidate and, with it, the
    candidates estimated within ``config.cost_tolerance`` of it; a failure rules out the
    candidates that recompute no more than it did and those whose budgets are at least its
    at every level (fidelity is not monotone in cost across levels, so cheaper candidates
    with tighter budgets stay open). At most
    ``config.max_trials`` are generated; the cheapest that passed is kept, with the forecast
    orders, CFG steps and probe it was tried with. The full model's images are
    ``reference``, else the profile's own final latents decoded (generated again only when
    the profile holds none). ``unet`` is left with the chosen routing attached, or with none
    when no candidate tried passes. ``candidates``: the schedules to search (cheapest first),
    instead of those planned from the profile's own block changes (a model-level search,
    :mod:`fragjobs.extraction.shared_schedule`).

    Returns:
        ``(schedule or None, one row per candidate tried: delta, shallow_delta,
        estimated_cost, ssim_min, ssim_mean, seeds generated, CFG-reuse steps)``.
    """
    gen = profiling_generation(profile, height, width)
    if reference is None:
        reference = reference_images(pipe, profile, height, width)
    if candidates is None:
        candidates = candidate_schedules(
            profile.mean_block_change(), profile.layer_time_ms, profile.config.steps, config
        )
    routing = _Routing(profile, config)
    rows: list[dict[str, float | None]] = []
    tried: dict[int, CachingSchedule] = {}
    worst_seed = profile.config.seeds[0]

    def passes(index: int) -> bool:
        nonlocal worst_seed
        schedule = routing.route(candidates[index])
        state = apply_block_caching(unet, schedule, measure=True)
        state.forecast_errors = routing.errors
        scores = seed_ssim_until(
            pipe, unet, profile, reference, gen, min_ssim=config.min_ssim, first=worst_seed
        )
        routing.learn(state)
        worst_seed = min(scores, key=scores.get)
        tried[index] = schedule
        rows.append(
            {
                "delta": schedule.delta,
                "shallow_delta": schedule.shallow_delta,
                "estimated_cost": schedule.estimated_cost,
                "ssim_min": round(scores[worst_seed], 6),
                "ssim_mean": round(sum(scores.values()) / len(scores), 6),
                "seeds": len(scores),
                "cfg_steps": len(schedule.cfg_steps),
            }
        )
        return len(scores) == len(profile.config.seeds) and scores[worst_seed] >= config.min_ssim

    best: int | None = None
    open_ = list(range(len(candidates)))  # not yet tried, cheaper than the best that passed
    while open_ and len(rows) < config.max_trials:
        index = open_[len(open_) // 2]
        if passes(index):
            best = index
            limit = candidates[index].estimated_cost - config.cost_tolerance
            open_ = [i for i in open_ if i < index and candidates[i].estimated_cost < limit]
        else:  # a schedule computing no more than a failed one fails too
            failed = candidates[index]
            open_ = [
                i
                for i in open_
                if i != index
                and not _within(candidates[i], failed)
                and not _looser(candidates[i], failed)
            ]
    if best is None:
        remove_block_caching(unet)
        return None, rows
    apply_block_caching(unet, tried[best])
    return tried[best], rows


def _looser(schedule: CachingSchedule, other: CachingSchedule) -> bool:
    """Whether ``schedule``'s budgets are at least ``other``'s at every level (a shallow
    budget of None, computed every step, is the strictest): it lets every level drift as far
    before recomputing, so where ``other`` lost too much it does too. Fidelity is not
    monotone in the estimated cost (a costly candidate with loose deep budgets fails where a
    cheap one with tight budgets passes), but it is in the budgets."""
    shallow = schedule.shallow_delta or 0.0
    return schedule.delta >= other.delta and shallow >= (other.shallow_delta or 0.0)


def _within(schedule: CachingSchedule, other: CachingSchedule) -> bool:
    """Whether ``schedule`` recomputes every block at no step that ``other`` does not."""
    return all(
        set(steps) <= set(other.recompute.get(block, ()))
        for block, steps in schedule.recompute.items()
    )
