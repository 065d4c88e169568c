"""Block caching: reuse a UNet block's previous output on the steps where it barely changes.

The profile records, per block (down, mid, up), the relative change of its output from one
step to the next. Following Block Caching (Wimbauer et al., CVPR 2024), a block is recomputed
when the change accumulated since its last computation would exceed ``delta``; on the other
steps its cached output is returned without running it. Step 0 always computes.

The schedule is applied with diffusers hooks (``diffusers.hooks.HookRegistry``): a step
counter on the UNet (it restarts when the timestep goes up, i.e. at a new generation) and one
cache hook per block. Both are removable by name with :func:`remove_block_caching`; their
state is reset between generations.

Example::

    schedule = plan_block_caching(profile, BlockCachingConfig(delta=0.3))
    apply_block_caching(unet, schedule)
    ...
    remove_block_caching(unet)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from fragjobs.errors import InvalidInputError

STEP_COUNTER_HOOK = "fragjobs_step_counter"
BLOCK_CACHE_HOOK = "fragjobs_block_cache"


@dataclass(frozen=True)
class BlockCachingConfig:
    """How a schedule is searched for.

    Args:
        deltas: candidate accumulated-change budgets, tried from the largest (fastest) down;
            the extraction keeps the fastest whose images stay within ``min_ssim`` of the full
            model's on the profiling seeds.
        min_ssim: the fidelity knob, in (0, 1]: SSIM against the full model required on
            every profiling seed (the worst seed decides).
    """

    deltas: tuple[float, ...] = (2.0, 1.5, 1.0, 0.7, 0.5, 0.35, 0.25, 0.15)
    min_ssim: float = 0.9

    def __post_init__(self) -> None:
        if not self.deltas or any(not isinstance(d, int | float) or d <= 0 for d in self.deltas):
            raise InvalidInputError(f"deltas must be positive numbers, got {self.deltas!r}")
        if not isinstance(self.min_ssim, int | float) or not 0 < self.min_ssim <= 1:
            raise InvalidInputError(f"min_ssim must be in (0, 1], got {self.min_ssim!r}")


@dataclass(frozen=True)
class CachingSchedule:
    """For ``steps`` inference steps: the steps at which each block is recomputed."""

    steps: int
    recompute: dict[str, tuple[int, ...]]
    delta: float
    estimated_cost: float  # fraction of block time still spent, from profiled block times
    block_time_ms: dict[str, float] = field(default_factory=dict)

    def skipped_fraction(self) -> float:
        """Fraction of block evaluations skipped (unweighted)."""
        total = self.steps * len(self.recompute)
        return 1 - sum(len(s) for s in self.recompute.values()) / total if total else 0.0


def plan_block_caching(
    block_change: dict[str, list[float]], block_time_ms: dict[str, float], steps: int, delta: float
) -> CachingSchedule:
    """The schedule for one ``delta``, from per-block changes ``c[t]`` (t = 1..steps-1)."""
    recompute = {}
    for block, changes in block_change.items():
        if len(changes) != steps - 1:
            raise InvalidInputError(
                f"{block}: {len(changes)} step changes recorded, {steps - 1} needed for "
                f"{steps} steps; profile with the same number of steps"
            )
        chosen, accumulated = [0], 0.0
        for t, change in enumerate(changes, start=1):
            accumulated += change
            if accumulated > delta:
                chosen.append(t)
                accumulated = 0.0
        recompute[block] = tuple(chosen)
    total = sum(block_time_ms.get(b, 1.0) for b in recompute) or 1.0
    cost = sum(block_time_ms.get(b, 1.0) * len(s) / steps for b, s in recompute.items()) / total
    return CachingSchedule(steps, recompute, delta, round(cost, 6), dict(block_time_ms))


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
    """Attach the schedule's hooks to ``unet`` (replacing any earlier block caching)."""
    from fragjobs.profiling import unet_blocks

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
    """Remove every block-caching hook (a no-op when none is attached)."""
    from fragjobs.profiling import unet_blocks

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
    profile: Any,
    config: BlockCachingConfig,
    *,
    height: int,
    width: int,
) -> tuple[CachingSchedule | None, list[dict[str, float | None]]]:
    """The fastest schedule whose images keep ``config.min_ssim`` against the full model.

    Full model and ``unet`` (with the schedule's hooks) generate the profiling seeds with
    the profiling settings; candidates are tried from the largest ``delta`` down and the
    first that passes is kept (larger deltas skip more). ``unet`` is left with the chosen
    schedule attached, or with none when no candidate passes.

    Returns:
        ``(schedule or None, one row per candidate: delta, estimated_cost, ssim_min,
        ssim_mean)``.
    """
    from fragjobs.generation import GenerationConfig, generate_images, with_unet
    from fragjobs.validation import compute_quality

    cfg = profile.config
    seeds = list(cfg.seeds)
    gen = GenerationConfig(
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        height=height,
        width=width,
        batch_size=len(seeds),
    )
    full = generate_images(pipe, profile.prompt, seeds, gen)
    fragment_pipe = with_unet(pipe, unet)
    changes, times = profile.mean_block_change(), profile.layer_time_ms
    rows: list[dict[str, float | None]] = []
    seen: set[tuple] = set()
    for delta in sorted(config.deltas, reverse=True):
        schedule = plan_block_caching(changes, times, cfg.steps, delta)
        signature = tuple(sorted(schedule.recompute.items()))
        if signature in seen:
            continue
        seen.add(signature)
        apply_block_caching(unet, schedule)
        images = generate_images(fragment_pipe, profile.prompt, seeds, gen)
        quality = compute_quality(full, images, profile.prompt)
        ssim = min(quality.ssim_per_image)  # every profiling seed must keep the fidelity
        rows.append(
            {
                "delta": delta,
                "estimated_cost": schedule.estimated_cost,
                "ssim_min": round(ssim, 6),
                "ssim_mean": round(quality.ssim, 6),
            }
        )
        if ssim >= config.min_ssim:
            return schedule, rows
    remove_block_caching(unet)
    return None, rows
