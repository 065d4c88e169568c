"""Block caching: reuse UNet blocks' previous outputs on the steps where they barely change.

The profile records, per block (down, mid, up), the relative change of its output from one
step to the next. Following Block Caching (Wimbauer et al., CVPR 2024), a block is recomputed
when the change accumulated since its last computation would exceed a budget; on the other
steps its cached output is returned without running it.

The blocks are grouped by UNet depth: level ``l`` is ``down_blocks.l`` with its mirror
``up_blocks.(L-1-l)`` (the mid block joins the deepest level). A deeper level is only worth
recomputing when everything shallower is recomputed too (it reads their fresh outputs, and
its output is only read by them), so the schedules are nested: each level's recompute steps
are a subset of the next shallower level's. Each level follows the change of its branch's
output (``up_blocks.(L-1-l)``): level 0 with ``shallow_delta`` (``None``: every step, as in
DeepCache), level ``l >= 1`` with ``delta * 2**(l-1)``. The first ``warmup_steps`` steps
always compute. With ``shallow_delta=None`` and a uniform schedule this is DeepCache; the
profiled, prompt-specific budgets make it non-uniform (dense where the prompt's features
move, sparse where they settle).

The schedule is applied with diffusers hooks (``diffusers.hooks.HookRegistry``): a step
counter on the UNet (it restarts when the timestep goes up, i.e. at a new generation) and one
cache hook per block. Both are removable by name with :func:`remove_block_caching`; their
state is reset between generations. Block caching stores no tensors: the schedule lives in the
manifest's ``dynamic_routing`` layer (:func:`routing_layer` writes it, :func:`caching_schedule`
reads it back).

Example::

    schedule = plan_block_caching(changes, times, steps=20, delta=0.25, shallow_delta=0.25)
    apply_block_caching(unet, schedule)
    ...
    remove_block_caching(unet)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from fragjobs.config import DEFAULT_FIDELITY
from fragjobs.errors import InvalidInputError
from fragjobs.extraction.fidelity import profiling_generation, reference_images, seed_ssim
from fragjobs.keys import check_fraction, check_int
from fragjobs.manifest import DynamicRoutingLayer, FragmentManifest
from fragjobs.profiling import PromptProfile, unet_blocks

STEP_COUNTER_HOOK = "fragjobs_step_counter"
BLOCK_CACHE_HOOK = "fragjobs_block_cache"
_BLOCK_NAME = re.compile(r"^(down_blocks|up_blocks)\.(\d+)$|^mid_block$")


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
    """

    deltas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0)
    shallow_deltas: tuple[float | None, ...] = (None, 0.15, 0.25, 0.4, 0.6, 1.0)
    warmup: float = 0.2
    min_ssim: float = DEFAULT_FIDELITY
    max_trials: int = 8
    cost_tolerance: float = 0.01

    def __post_init__(self) -> None:
        _check_positive(self.deltas, "deltas")
        _check_positive(self.shallow_deltas, "shallow_deltas", allow_none=True)
        check_int(self.max_trials, "max_trials", minimum=1)
        _check_below_one(self.warmup, "warmup")
        check_fraction(self.min_ssim, "min_ssim")
        _check_below_one(self.cost_tolerance, "cost_tolerance")

    def warmup_steps(self, steps: int) -> int:
        """Steps at the start that always compute, for ``steps`` inference steps."""
        return max(1, round(self.warmup * steps))


@dataclass(frozen=True)
class CachingSchedule:
    """For ``steps`` inference steps: the steps at which each block is recomputed."""

    steps: int
    recompute: dict[str, tuple[int, ...]]
    delta: float
    estimated_cost: float  # fraction of block time still spent, from profiled block times
    block_time_ms: dict[str, float] = field(default_factory=dict)
    shallow_delta: float | None = None
    warmup_steps: int = 1

    def skipped_fraction(self) -> float:
        """Fraction of block evaluations skipped (unweighted)."""
        total = self.steps * len(self.recompute)
        return 1 - sum(len(s) for s in self.recompute.values()) / total if total else 0.0


def block_levels(blocks: list[str] | dict[str, Any]) -> dict[str, int]:
    """UNet depth of each block: ``down_blocks.l`` and ``up_blocks.(L-1-l)`` are level ``l``."""
    names = list(blocks)
    bad = [n for n in names if not _BLOCK_NAME.match(n)]
    if bad:
        raise InvalidInputError(f"not UNet block names: {bad}")
    depth = sum(n.startswith("down_blocks.") for n in names)
    if depth == 0:
        raise InvalidInputError("block caching needs the UNet's down blocks")
    levels = {}
    for name in names:
        if name == "mid_block":
            levels[name] = depth - 1
        else:
            kind, index = name.split(".")
            index = int(index)
            levels[name] = index if kind == "down_blocks" else depth - 1 - index
            if not 0 <= levels[name] < depth:
                raise InvalidInputError(f"{name} has no mirror block among {names}")
    return levels


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
        signal = _level_signal(block_change, levels, level, depth)
        chosen, accumulated, allowed_set = [], 0.0, set(allowed)
        for t in range(steps):
            accumulated += signal[t - 1] if t else 0.0
            if t in allowed_set and (t < warmup_steps or accumulated > budget):
                chosen.append(t)
                accumulated = 0.0
        level_steps[level] = tuple(chosen)
        allowed = chosen
    recompute = {block: level_steps[level] for block, level in levels.items()}
    total = sum(block_time_ms.get(b, 1.0) for b in recompute) or 1.0
    cost = sum(block_time_ms.get(b, 1.0) * len(s) / steps for b, s in recompute.items()) / total
    return CachingSchedule(
        steps,
        recompute,
        delta,
        round(cost, 6),
        dict(block_time_ms),
        shallow_delta=shallow_delta,
        warmup_steps=warmup_steps,
    )


def _level_signal(block_change, levels, level, depth) -> list[float]:
    """The change of the level's branch output (its up block), else of its largest block."""
    up = f"up_blocks.{depth - 1 - level}"
    if up in block_change:
        return list(block_change[up])
    members = [block_change[b] for b, lv in levels.items() if lv == level]
    return [max(values) for values in zip(*members, strict=True)]


def candidate_schedules(
    block_change: dict[str, list[float]],
    block_time_ms: dict[str, float],
    steps: int,
    config: BlockCachingConfig,
) -> list[CachingSchedule]:
    """Every distinct schedule of the config's budgets, cheapest (estimated) first."""
    seen, out = set(), []
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
            signature = tuple(sorted(schedule.recompute.items()))
            if signature not in seen:
                seen.add(signature)
                out.append(schedule)
    return sorted(out, key=lambda s: (s.estimated_cost, s.delta))


class _StepState:
    def __init__(self) -> None:
        self.step = -1
        self.last_timestep: float | None = None


class StepCounterHook(ModelHook):
    """Counts UNet calls; a timestep higher than the last one starts a new generation."""

    _is_stateful = True

    def __init__(self, state: _StepState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = float(torch.as_tensor(timestep).flatten()[0]) if timestep is not None else None
        last = self.state.last_timestep
        if value is None or last is None or value >= last:
            self.state.step = 0
        else:
            self.state.step += 1
        self.state.last_timestep = value
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.step, self.state.last_timestep = -1, None
        return module


class BlockCacheHook(ModelHook):
    """Runs the block on its recompute steps, returns its cached output otherwise."""

    _is_stateful = True

    def __init__(self, state: _StepState, recompute: tuple[int, ...], horizon: int) -> None:
        super().__init__()
        self.state = state
        self.recompute = frozenset(recompute)
        self.horizon = horizon  # past the schedule's steps every step computes
        self.cache: Any = None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        step = self.state.step
        if self.cache is None or step in self.recompute or not 0 <= step < self.horizon:
            self.cache = self.fn_ref.original_forward(*args, **kwargs)
        return self.cache

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.cache = None
        return module


def apply_block_caching(unet: torch.nn.Module, schedule: CachingSchedule) -> None:
    """Attach the schedule's hooks to ``unet`` (replacing any earlier block caching).

    Raises:
        InvalidInputError: the schedule names a block ``unet`` does not have.
    """
    remove_block_caching(unet)
    blocks = unet_blocks(unet)
    unknown = sorted(set(schedule.recompute) - set(blocks))
    if unknown:
        raise InvalidInputError(f"caching schedule names unknown blocks: {unknown}")
    state = _StepState()
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(
        StepCounterHook(state), STEP_COUNTER_HOOK
    )
    for name, steps in schedule.recompute.items():
        if len(steps) >= schedule.steps:
            continue  # recomputed every step: no hook needed
        registry = HookRegistry.check_if_exists_or_initialize(blocks[name])
        registry.register_hook(BlockCacheHook(state, steps, schedule.steps), BLOCK_CACHE_HOOK)


def remove_block_caching(unet: torch.nn.Module) -> None:
    """Remove every block-caching hook (a no-op when none is attached); the UNet computes
    every block at every step again."""
    if hasattr(unet, "_diffusers_hook"):
        unet._diffusers_hook.remove_hook(STEP_COUNTER_HOOK, recurse=False)
    for block in unet_blocks(unet).values():
        if hasattr(block, "_diffusers_hook"):
            block._diffusers_hook.remove_hook(BLOCK_CACHE_HOOK, recurse=False)


def reset_block_caching(unet: torch.nn.Module) -> None:
    """Forget cached outputs and the step count (done automatically at a new generation)."""
    if hasattr(unet, "_diffusers_hook"):
        unet._diffusers_hook.reset_stateful_hooks(recurse=True)


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
) -> tuple[CachingSchedule | None, list[dict[str, float | None]]]:
    """The fastest schedule whose images keep ``config.min_ssim`` against the full model.

    The candidates (every budget pair, sorted by the cost estimated from profiled block
    times) are bisected: a candidate passes when the worst profiling seed keeps
    ``config.min_ssim``. A pass rules out every costlier candidate; a failure rules out the
    candidates that recompute no more than it did (fidelity is not monotone in cost across
    levels, so cheaper candidates with other recompute steps stay open) and, with it, the
    candidates estimated within ``config.cost_tolerance`` of it. At most
    ``config.max_trials`` are generated; the cheapest that passed is kept. The full model's
    images are ``reference``, else the profile's own final latents decoded (generated again
    only when the profile holds none). ``unet`` is left with the chosen schedule attached, or
    with none when no candidate tried passes.

    Returns:
        ``(schedule or None, one row per candidate tried: delta, shallow_delta,
        estimated_cost, ssim_min, ssim_mean)``.
    """
    gen = profiling_generation(profile, height, width)
    if reference is None:
        reference = reference_images(pipe, profile, height, width)
    candidates = candidate_schedules(
        profile.mean_block_change(), profile.layer_time_ms, profile.config.steps, config
    )
    rows: list[dict[str, float | None]] = []
    passed: dict[int, bool] = {}

    def passes(index: int) -> bool:
        schedule = candidates[index]
        apply_block_caching(unet, schedule)
        ssim, mean = seed_ssim(pipe, unet, profile, reference, gen)  # the worst seed decides
        rows.append(
            {
                "delta": schedule.delta,
                "shallow_delta": schedule.shallow_delta,
                "estimated_cost": schedule.estimated_cost,
                "ssim_min": round(ssim, 6),
                "ssim_mean": round(mean, 6),
            }
        )
        passed[index] = ssim >= config.min_ssim
        return passed[index]

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
            open_ = [i for i in open_ if i != index and not _within(candidates[i], failed)]
    if best is None:
        remove_block_caching(unet)
        return None, rows
    apply_block_caching(unet, candidates[best])
    return candidates[best], rows


def _within(schedule: CachingSchedule, other: CachingSchedule) -> bool:
    """Whether ``schedule`` recomputes every block at no step that ``other`` does not."""
    return all(
        set(steps) <= set(other.recompute.get(block, ()))
        for block, steps in schedule.recompute.items()
    )


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
    )
