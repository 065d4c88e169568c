"""Block-caching plans: skip denoiser blocks on the steps where they barely change.

The profile records, per block (down, mid, up), the relative change of its output from one step
to the next. Following Block Caching (Wimbauer et al., CVPR 2024), a block is recomputed when
the change accumulated since its last computation would exceed a budget; on the other steps its
cached output is returned without running it.

The blocks are grouped by depth, as the pipeline family pairs them (:mod:`fragjobs.families`):
in a UNet level ``l`` is ``down_blocks.l`` with its mirror ``up_blocks.(L-1-l)`` (the mid block
joins the deepest level); in a transformer block ``i`` pairs with ``N-1-i``. A skipped UNet
block returns its cached output, a skipped transformer block its input plus its cached
residual. A deeper level is only worth recomputing when everything shallower is recomputed too
(it reads their fresh outputs, and its output is only read by them), so the schedules are
nested: each level's recompute steps are a subset of the next shallower level's. Each level
follows the change of its branch's output (``up_blocks.(L-1-l)``, the later block of a
transformer's pair): level 0 with ``shallow_delta`` (``None``: every step, as in DeepCache),
level ``l >= 1`` with ``delta * 2**(l-1)``. The first ``warmup_steps`` steps always compute.
With ``shallow_delta=None`` and a uniform schedule this is DeepCache; the profiled, prompt-
specific budgets make it non-uniform (dense where the prompt's features move, sparse where they
settle).

Three optional parts, each a switch of :class:`BlockCachingConfig`: a skipped level output
block's output (or residual) is forecast from its last computed outputs (``forecast``, order
per block chosen by the search: :mod:`fragjobs.extraction.forecast`); on steps where the
guidance difference is stable only the conditional CFG half runs (``cfg_reuse``,
:func:`plan_cfg_steps`); a probe on the first block forces a full recompute when a sample
drifts past the profiled change (``probe``, :func:`calibrate_probe`).

The schedule is applied with diffusers hooks (:mod:`fragjobs.extraction.routing_hooks`),
removable by name with :func:`remove_block_caching`; their state is reset between generations.
Block caching stores no tensors: the schedule lives in the manifest's ``dynamic_routing`` layer
(:func:`routing_layer` writes it, :func:`caching_schedule` reads it back); the search is
:mod:`fragjobs.extraction.caching`.

Example::

    schedule = plan_block_caching(changes, times, steps=20, delta=0.25, shallow_delta=0.25)
    apply_block_caching(unet, schedule)
    ...
    remove_block_caching(unet)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from fragjobs.config import DEFAULT_FIDELITY
from fragjobs.errors import InvalidInputError
from fragjobs.extraction.schedule import CachingSchedule
from fragjobs.families import block_levels, level_output_block
from fragjobs.keys import check_fraction, check_int
from fragjobs.manifest import DynamicRoutingLayer, FragmentManifest

_SWITCHES = ("forecast", "cfg_reuse", "probe")
PROBE_SLACK = 0.25  # the probe's margin over the worst profiling seed's drift


def _check_positive(values: tuple, name: str, *, allow_none: bool = False) -> None:
    if not values:
        raise InvalidInputError(f"{name} must not be empty; pass at least one budget")
    for v in values:
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise InvalidInputError(f"{name} must be positive numbers, got {values!r}")


def _check_below_one(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise InvalidInputError(f"{name} must be a fraction in [0, 1), got {value!r}")


def _floor_pairs(floor: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``floor`` as sorted ``(block, steps)`` tuples (JSON gives lists)."""
    pairs = floor.items() if isinstance(floor, dict) else floor
    try:
        out = tuple(sorted((str(block), tuple(steps)) for block, steps in pairs))
    except (TypeError, ValueError):
        raise InvalidInputError(f"floor must be (block, steps) pairs, got {floor!r}") from None
    for block, steps in out:
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in steps):
            raise InvalidInputError(f"floor of {block}: steps must be step indices, got {steps!r}")
    return out


@dataclass(frozen=True)
class BlockCachingConfig:
    """How a schedule is searched for.

    Args:
        deltas: candidate change budgets of the deep levels (level 1; level ``l`` gets
            ``delta * 2**(l-1)``).
        shallow_deltas: candidate budgets of level 0 (``None``: computed every step).
        warmup: fraction of the steps, at the start, that always compute (at least one):
            the layout is decided there, and skipping in them flips it on some seeds.
        min_ssim: the fidelity knob, in (0, 1]: SSIM against the full model required on
            every profiling seed (the worst seed decides).
        max_trials: candidate schedules generated at most while searching (a bisection over
            the candidates sorted by estimated cost).
        cost_tolerance: once a schedule passed, a cheaper candidate is tried only if its
            estimated cost (fraction of the UNet's compute) is lower by more than this:
            closer ones would buy a few percent of speed for a whole trial of generation.
        forecast: extrapolate skipped up blocks' outputs (order 0, 1 or 2 per block, the
            one of least error measured during the search) instead of reusing them.
        cfg_reuse: run only the conditional CFG half on the steps where the guidance
            difference is stable (accumulated change within the candidate's ``delta``).
        probe: recompute every block when a sample's first down block moves more than the
            profiling seeds did (by :data:`PROBE_SLACK` over the worst of them).
        floor: ``(block, steps)`` pairs each block recomputes at least: the schedule of a
            fragment that failed its gate (the gate ladder), so that every candidate is a
            planned schedule united with it and computes more than the one that failed
            (:func:`candidate_schedules`). Empty: none.

    The three switches are off by default because they did not measure better on the
    ``shapes`` model (two prompts outside the results page, 16 unseen seeds each, 20 steps):
    the forecast errors measured at recompute steps chose order 0 (plain reuse) for every
    deep up block, so forecasting changed nothing or led the search to a costlier schedule;
    CFG reuse found no stable step on one prompt and, on the other, passed only at a
    costlier block schedule; the probe never fired on an unseen seed (SSIM identical)
    while running ``down_blocks.0`` at every step raised the estimated cost.
    """

    deltas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0)
    shallow_deltas: tuple[float | None, ...] = (None, 0.15, 0.25, 0.4, 0.6, 1.0)
    warmup: float = 0.2
    min_ssim: float = DEFAULT_FIDELITY
    max_trials: int = 8
    cost_tolerance: float = 0.01
    forecast: bool = False
    cfg_reuse: bool = False
    probe: bool = False
    floor: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", _floor_pairs(self.floor))
        for name in _SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(
                    f"{name} must be true or false, got {getattr(self, name)!r}"
                )
        _check_positive(self.deltas, "deltas")
        _check_positive(self.shallow_deltas, "shallow_deltas", allow_none=True)
        check_int(self.max_trials, "max_trials", minimum=1)
        _check_below_one(self.warmup, "warmup")
        check_fraction(self.min_ssim, "min_ssim")
        _check_below_one(self.cost_tolerance, "cost_tolerance")

    def params(self) -> dict[str, Any]:
        """The config as hashed into a fragment's key: the switches only when on, so that
        a config with them off has the key it had before they existed."""
        out = asdict(self)
        for name in _SWITCHES:
            if not out[name]:
                del out[name]
        if not self.floor:
            del out["floor"]
        return out

    def warmup_steps(self, steps: int) -> int:
        """Steps at the start that always compute, for ``steps`` inference steps."""
        return max(1, round(self.warmup * steps))


def plan_block_caching(
    block_change: dict[str, list[float]],
    block_time_ms: dict[str, float],
    steps: int,
    delta: float,
    *,
    shallow_delta: float | None = None,
    warmup_steps: int = 1,
) -> CachingSchedule:
    """The nested schedule for one pair of budgets, from per-block changes ``c[t]``."""
    for block, changes in block_change.items():
        if len(changes) != steps - 1:
            raise InvalidInputError(
                f"{block}: {len(changes)} step changes recorded, {steps - 1} needed for "
                f"{steps} steps; profile with the same number of steps"
            )
    levels = block_levels(block_change)
    depth = max(levels.values()) + 1
    allowed = list(range(steps))
    level_steps: dict[int, tuple[int, ...]] = {}
    for level in range(depth):
        budget = shallow_delta if level == 0 else delta * 2 ** (level - 1)
        if budget is None:
            level_steps[level] = tuple(allowed)
            continue
        signal = _level_signal(block_change, levels, level)
        chosen, accumulated, allowed_set = [], 0.0, set(allowed)
        for t in range(steps):
            accumulated += signal[t - 1] if t else 0.0
            if t in allowed_set and (t < warmup_steps or accumulated > budget):
                chosen.append(t)
                accumulated = 0.0
        level_steps[level] = tuple(chosen)
        allowed = chosen
    recompute = {block: level_steps[level] for block, level in levels.items()}
    return CachingSchedule(
        steps,
        recompute,
        delta,
        _estimated_cost(recompute, block_time_ms, steps),
        dict(block_time_ms),
        shallow_delta=shallow_delta,
        warmup_steps=warmup_steps,
    )


def _estimated_cost(
    recompute: dict[str, tuple[int, ...]], block_time_ms: dict[str, float], steps: int
) -> float:
    """Fraction of the block time spent recomputing ``recompute``, from profiled times."""
    total = sum(block_time_ms.get(b, 1.0) for b in recompute) or 1.0
    spent = sum(block_time_ms.get(b, 1.0) * len(s) / steps for b, s in recompute.items())
    return round(spent / total, 6)


def _level_signal(block_change, levels, level) -> list[float]:
    """The change of the block handing the level's result on (a UNet's up block, a
    transformer's later block of the pair)."""
    return list(block_change[level_output_block(levels, level)])


def candidate_schedules(
    block_change: dict[str, list[float]],
    block_time_ms: dict[str, float],
    steps: int,
    config: BlockCachingConfig,
) -> list[CachingSchedule]:
    """Every distinct schedule of the config's budgets, cheapest (estimated) first.

    With a ``config.floor``, each schedule is united with it (a block recomputes at the
    steps of either; the union of two nested schedules is nested) and the floor itself is
    left out: every candidate computes more than the schedule that failed.
    """
    floor = dict(config.floor)
    if any(t >= steps for s in floor.values() for t in s):
        raise InvalidInputError(f"floor {config.floor!r} names steps beyond {steps} steps")
    seen, out = {tuple(sorted(floor.items()))} if floor else set(), []
    for shallow in config.shallow_deltas:
        for delta in config.deltas:
            schedule = plan_block_caching(
                block_change,
                block_time_ms,
                steps,
                delta,
                shallow_delta=shallow,
                warmup_steps=config.warmup_steps(steps),
            )
            if floor:
                schedule = _united(schedule, floor)
            signature = tuple(sorted(schedule.recompute.items()))
            if signature not in seen:
                seen.add(signature)
                out.append(schedule)
    return sorted(out, key=lambda s: (s.estimated_cost, s.delta))


def _united(schedule: CachingSchedule, floor: dict[str, tuple[int, ...]]) -> CachingSchedule:
    """``schedule`` recomputing every block also at its ``floor`` steps."""
    recompute = {
        block: tuple(sorted(set(steps) | set(floor.get(block, ()))))
        for block, steps in schedule.recompute.items()
    }
    cost = _estimated_cost(recompute, schedule.block_time_ms, schedule.steps)
    return replace(schedule, recompute=recompute, estimated_cost=cost)


def plan_cfg_steps(
    guidance_change: dict[int, float], steps: int, budget: float, warmup_steps: int
) -> tuple[int, ...]:
    """The steps whose unconditional output is rebuilt from the last guidance difference.

    ``guidance_change[t]``: relative change of ``cond - uncond`` from step ``t - 1`` to ``t``.
    Both halves run in the warm-up and whenever the change accumulated since they last ran
    would exceed ``budget``; a step without a measured change runs both.
    """
    reuse, accumulated = [], 0.0
    for t in range(warmup_steps, steps):
        if t not in guidance_change:
            accumulated = 0.0
            continue
        accumulated += guidance_change[t]
        if accumulated > budget:
            accumulated = 0.0
        else:
            reuse.append(t)
    return tuple(reuse)


def calibrate_probe(
    per_seed_change: torch.Tensor, full_steps: frozenset[int], *, slack: float = PROBE_SLACK
) -> tuple[tuple[float, ...], float]:
    """The probe's expected change per step and its margin, from the profiling seeds.

    ``per_seed_change``: ``(seeds, steps - 1)``, the probe block's relative output change at
    each step. The margin is ``1 + slack`` times the largest ratio, over the seeds and the
    stretches between full steps, of a seed's accumulated change to the mean seed's: no
    profiling seed makes the probe fire, an unseen one that moves further does.
    """
    mean = per_seed_change.float().mean(0)
    worst = 1.0
    for row in per_seed_change.float():
        drift = expected = 0.0
        for t in range(1, per_seed_change.shape[1] + 1):
            if t in full_steps:
                drift = expected = 0.0
                continue
            drift, expected = drift + float(row[t - 1]), expected + float(mean[t - 1])
            worst = max(worst, drift / max(expected, 1e-12))
    return tuple(round(float(v), 6) for v in mean), round(worst * (1 + slack), 6)


def routing_layer(
    schedule: CachingSchedule | None,
    search: list[dict[str, float | None]],
    config: BlockCachingConfig,
) -> DynamicRoutingLayer:
    """The manifest's ``dynamic_routing`` layer for a search's result (disabled when None)."""
    if schedule is None:
        return DynamicRoutingLayer(
            enabled=False,
            min_ssim=config.min_ssim,
            search=search,
            reason=f"no candidate schedule kept SSIM >= {config.min_ssim} on the profiling seeds",
        )
    return DynamicRoutingLayer(
        enabled=True,
        steps=schedule.steps,
        delta=schedule.delta,
        shallow_delta=schedule.shallow_delta,
        warmup_steps=schedule.warmup_steps,
        schedule={b: list(s) for b, s in sorted(schedule.recompute.items())},
        estimated_cost=schedule.estimated_cost,
        min_ssim=config.min_ssim,
        search=search,
        forecast_orders=dict(sorted(schedule.forecast_orders.items())) or None,
        cfg_steps=list(schedule.cfg_steps) or None,
        probe_change=list(schedule.probe_change) or None,
        probe_margin=schedule.probe_margin,
    )


def caching_schedule(manifest: FragmentManifest) -> CachingSchedule | None:
    """The block-caching schedule a manifest records, or None when it has none."""
    routing = manifest.dynamic_routing
    if not routing.enabled or not routing.schedule or routing.steps is None:
        return None
    return CachingSchedule(
        steps=routing.steps,
        recompute={b: tuple(s) for b, s in routing.schedule.items()},
        delta=routing.delta or 0.0,
        estimated_cost=routing.estimated_cost or 1.0,
        shallow_delta=routing.shallow_delta,
        warmup_steps=routing.warmup_steps or 1,
        forecast_orders=dict(routing.forecast_orders or {}),
        cfg_steps=tuple(routing.cfg_steps or ()),
        probe_change=tuple(routing.probe_change or ()),
        probe_margin=routing.probe_margin,
    )
