"""The diffusers hooks that carry out a :class:`~fragjobs.extraction.schedule.CachingSchedule`.

* a step counter on the UNet (a timestep higher than the last one starts a new generation);
* when the schedule has CFG-reuse steps, a hook on the UNet that, on those steps, runs only the
  conditional half of the ``[uncond; cond]`` batch and rebuilds the unconditional output as
  ``cond - d``, ``d`` the guidance difference of the last step that ran both halves;
* one cache hook per block that is not recomputed every step: it runs the block on its
  recompute steps and otherwise returns its last output, or the forecast of its last outputs
  (:mod:`fragjobs.extraction.forecast`). For a family whose blocks run in sequence (a
  transformer's, :mod:`fragjobs.families`) the hook keeps the block's residual (output minus
  input) instead and returns the current input plus the reused or forecast residual. On a CFG-
  reuse step a computed block's cache moves both halves by the conditional half's change (the
  guidance difference is held), and a skipped block returns the conditional half of its cache,
  so caches always hold the full batch;
* with a probe, the first block runs every step and, when a sample's change of its output
  (residual) since the last full step exceeds the profiled change by the schedule's margin,
  makes every block recompute at this step (it runs first).

Every hook is removable by name (:func:`remove_block_caching`) and resets with the pipeline's
``reset_stateful_hooks``; after removal the UNet computes exactly as before they were added.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.forecast import (
    MAX_ORDER,
    ForecastErrors,
    first_tensor,
    forecast,
    map_tensors,
    zip_tensors,
)
from fragjobs.extraction.schedule import CachingSchedule
from fragjobs.families import denoiser_blocks, denoiser_family, first_block, level_output_blocks

STEP_COUNTER_HOOK = "fragjobs_step_counter"
BLOCK_CACHE_HOOK = "fragjobs_block_cache"
CFG_REUSE_HOOK = "fragjobs_cfg_reuse"


class RoutingState:
    """What the hooks of one UNet share: the step, and what a search reads back."""

    def __init__(self) -> None:
        self.step = -1
        self.last_timestep: float | None = None
        self.force = False  # the probe asked every block to recompute at this step
        self.half: int | None = None  # on a CFG-reuse step: the size of the cond half
        self.paired = False  # this step's batch is [uncond; cond] (classifier-free guidance)
        self.probe_fired: list[int] = []  # steps the probe forced, over all generations
        self.forecast_errors: ForecastErrors | None = None  # set to measure the orders
        self.guidance_change: dict[int, list[float]] = {}  # step: change of cond - uncond

    def mean_guidance_change(self) -> dict[int, float]:
        """Per step: the guidance difference's relative change, mean over the samples."""
        return {t: sum(v) / len(v) for t, v in sorted(self.guidance_change.items()) if v}


class StepCounterHook(ModelHook):
    """Counts UNet calls; a timestep higher than the last one starts a new generation."""

    _is_stateful = True

    def __init__(self, state: RoutingState) -> None:
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
        self.state.force, self.state.half = False, None
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        half = sample.shape[0] // 2
        self.state.paired = sample.shape[0] % 2 == 0 and torch.equal(sample[:half], sample[half:])
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.step, self.state.last_timestep = -1, None
        return module


class CfgReuseHook(ModelHook):
    """On its steps, runs the UNet on the conditional half and rebuilds the other half."""

    _is_stateful = True

    def __init__(self, state: RoutingState, steps: tuple[int, ...]) -> None:
        super().__init__()
        self.state = state
        self.steps = frozenset(steps)
        self.difference: torch.Tensor | None = None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        if self.state.step == 0:
            self.difference = None  # a new generation
        n = sample.shape[0]
        half, cfg = n // 2, self.state.paired
        if cfg and self.difference is not None and self.state.step in self.steps:
            self.state.half = half
            out = self.fn_ref.original_forward(*_cond_half(args, n), **_cond_half(kwargs, n))
            cond = _sample_of(out)
            return _with_sample(out, torch.cat([cond - self.difference, cond]))
        out = self.fn_ref.original_forward(*args, **kwargs)
        if cfg:
            eps = _sample_of(out)
            difference = eps[half:] - eps[:half]
            if self.difference is not None:
                change = (difference - self.difference).flatten(1).norm(dim=1)
                scale = self.difference.flatten(1).norm(dim=1).clamp_min(1e-12)
                measured = self.state.guidance_change.setdefault(self.state.step, [])
                measured.extend((change / scale).tolist())
            self.difference = difference
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.difference = None
        return module


def _cond_half(value: Any, n: int) -> Any:
    """The conditional half of every batch-sized tensor in ``value`` (nested)."""
    if isinstance(value, torch.Tensor):
        return value[n // 2 :] if value.dim() and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _cond_half(v, n) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_cond_half(v, n) for v in value)
    return value


def _sample_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    return (sample, *out[1:]) if isinstance(out, tuple) else type(out)(sample=sample)


class BlockCacheHook(ModelHook):
    """Runs the block on its recompute steps; reuses or forecasts its output otherwise."""

    _is_stateful = True

    def __init__(
        self,
        name: str,
        state: RoutingState,
        recompute: tuple[int, ...],
        horizon: int,
        *,
        order: int = 0,
        probe: tuple[tuple[float, ...], float, frozenset[int]] | None = None,
        forecastable: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.name, self.state, self.order = name, state, order
        self.recompute = frozenset(recompute)
        self.horizon = horizon  # past the schedule's steps every step computes
        self.keep = MAX_ORDER + 1 if order or forecastable else 1
        self.residual = residual  # keep output - input; a skip returns input + residual
        self.probe = probe  # (profiled change per step, margin, full steps)
        self.history: list[tuple[int, Any]] = []
        self.drift: Any = 0.0  # per sample, since the last full step
        self.expected = 0.0

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state, step = self.state, self.state.step
        outside = not 0 <= step < self.horizon
        run = not self.history or outside or state.force or step in self.recompute
        if not run and self.probe is None:
            predicted = self._predicted(step)
            if state.half:
                predicted = map_tensors(lambda t: t[state.half :], predicted)
            return _input_of(args, kwargs) + predicted if self.residual else predicted
        result = self.fn_ref.original_forward(*args, **kwargs)
        out = result - _input_of(args, kwargs) if self.residual else result
        if self.probe is not None and self.history and not outside:
            self._probe(step, out)
        if state.half and self.history:  # both halves move by the cond half's change
            predicted = self._predicted(step)
            out_full = zip_tensors(_shift_both_halves, predicted, out)
        else:
            out_full = out
        if state.forecast_errors is not None and self.keep > 1 and self.history:
            state.forecast_errors.record(self.name, self.history, step, out_full)
        if outside or (self.history and step <= self.history[-1][0]):
            self.history = []
        self.history = [*self.history, (step, out_full)][-self.keep :]
        return result

    def _predicted(self, step: int) -> Any:
        return forecast(self.history, step, self.order) if self.order else self.history[-1][1]

    def _probe(self, step: int, out: Any) -> None:
        expected, margin, full = self.probe
        state = self.state
        if step in full or state.force:
            self.drift = self.expected = 0.0
            return
        now, before = first_tensor(out).float(), first_tensor(self.history[-1][1]).float()
        if state.half:
            before = before[state.half :]
        change = (now - before).flatten(1).norm(dim=1)
        change = change / before.flatten(1).norm(dim=1).clamp_min(1e-12)
        if state.paired and not state.half:  # per sample, over its CFG pair (as profiled)
            change = change.view(2, -1).mean(0)
        self.drift = self.drift + change  # per sample: the worst one decides
        self.expected += expected[step - 1] if 0 < step <= len(expected) else 0.0
        if float(torch.as_tensor(self.drift).max()) > margin * max(self.expected, 1e-12):
            state.force = True
            state.probe_fired.append(step)
            self.drift = self.expected = 0.0

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.history = []
        self.drift = self.expected = 0.0
        return module


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """A sequential block's input hidden states (its first argument)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _shift_both_halves(cached: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The full-batch cache moved by the change of its conditional half to ``cond``."""
    change = cond - cached[cached.shape[0] - cond.shape[0] :]
    return cached + torch.cat([change, change])


def apply_block_caching(
    unet: torch.nn.Module, schedule: CachingSchedule, *, measure: bool = False
) -> RoutingState:
    """Attach the schedule's hooks to the denoiser ``unet`` (a UNet or a transformer; replacing
    any earlier block caching).

    ``measure``: also record, in the returned state, each order's forecast error and the
    guidance difference's change per step (what a search chooses orders and CFG steps by).

    Returns:
        The hooks' shared state (a search reads the forecast errors and guidance changes
        from it).

    Raises:
        InvalidInputError: the schedule names a block ``unet`` does not have.
    """
    remove_block_caching(unet)
    blocks = denoiser_blocks(unet)
    residual = denoiser_family(unet).residual_cache
    unknown = sorted(set(schedule.recompute) - set(blocks))
    if unknown:
        raise InvalidInputError(f"caching schedule names unknown blocks: {unknown}")
    state = RoutingState()
    state.forecast_errors = ForecastErrors() if measure else None
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    if schedule.cfg_steps or measure:  # registered first: runs inside the step counter
        registry.register_hook(CfgReuseHook(state, schedule.cfg_steps), CFG_REUSE_HOOK)
    registry.register_hook(StepCounterHook(state), STEP_COUNTER_HOOK)
    probe = None
    probe_block = first_block(blocks)
    if schedule.probe_change and schedule.probe_margin is not None:
        probe = (schedule.probe_change, schedule.probe_margin, schedule.full_steps())
    forecastable = set(level_output_blocks(blocks))
    for name, steps in schedule.recompute.items():
        probed = probe is not None and name == probe_block
        if len(steps) >= schedule.steps and not probed and not schedule.cfg_steps:
            continue  # recomputed every step, full batch: no hook needed
        hook = BlockCacheHook(
            name,
            state,
            steps,
            schedule.steps,
            order=schedule.forecast_orders.get(name, 0),
            probe=probe if probed else None,
            forecastable=name in forecastable,
            residual=residual,
        )
        HookRegistry.check_if_exists_or_initialize(blocks[name]).register_hook(
            hook, BLOCK_CACHE_HOOK
        )
    return state


def remove_block_caching(unet: torch.nn.Module) -> None:
    """Remove every dynamic-routing hook (a no-op when none is attached); the UNet computes
    every block of both CFG halves at every step again."""
    if hasattr(unet, "_diffusers_hook"):
        unet._diffusers_hook.remove_hook(STEP_COUNTER_HOOK, recurse=False)
        unet._diffusers_hook.remove_hook(CFG_REUSE_HOOK, recurse=False)
    for block in denoiser_blocks(unet).values():
        if hasattr(block, "_diffusers_hook"):
            block._diffusers_hook.remove_hook(BLOCK_CACHE_HOOK, recurse=False)


def reset_block_caching(unet: torch.nn.Module) -> None:
    """Forget cached outputs and the step count (done automatically at a new generation)."""
    if hasattr(unet, "_diffusers_hook"):
        unet._diffusers_hook.reset_stateful_hooks(recurse=True)
