"""Two denoisers that compute the same first steps share them: one run, then a resumed one.

A fragment that changes no weight and recomputes every block on its first ``k`` steps (its
caching schedule's warm-up) computes exactly what the full model computes on those steps. A
gate that needs both models' images of the same seeds therefore runs the fragment once,
keeps the latents and the scheduler after step ``k`` (:func:`generate_with_snapshots`), and
runs only the remaining steps with the full model from there (:func:`resume_latents`):
``k`` steps fewer of the full model per seed, the same images.

Resuming goes through the pipeline's own ``__call__`` with its ``latents`` argument and a
stand-in scheduler (:class:`_Resumed`) that hands the pipeline the remaining timesteps and
delegates every step to a copy of the scheduler as it was after step ``k`` (its step index
and multistep history included). That is exact only for a scheduler whose steps draw no
noise (:func:`resumable`): a stochastic one would draw different noise in the resumed run.

Example::

    frag, snaps = generate_with_snapshots(frag_pipe, prompt, seeds, gen, shared_steps=4)
    full = resume_latents(pipe, prompt, snaps, gen)  # == the full model's final latents
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from fragjobs.errors import InvalidInputError
from fragjobs.generation.generate import GenerationConfig, pipeline_call
from fragjobs.keys import check_seeds, normalise_prompt

_DETERMINISTIC = {
    "DDIMScheduler": lambda config: True,  # eta is 0 in every call here
    "DPMSolverMultistepScheduler": lambda config: "sde" not in config.algorithm_type,
    "EulerDiscreteScheduler": lambda config: True,  # s_churn 0: its noise is multiplied by 0
    "PNDMScheduler": lambda config: True,
    "UniPCMultistepScheduler": lambda config: True,
}
"""The scheduler classes whose steps draw no noise (per config), by class name."""


@dataclass(frozen=True)
class Snapshot:
    """One batch after ``step`` steps: its seeds, latents and scheduler (a copy)."""

    seeds: tuple[int, ...]
    step: int
    latents: torch.Tensor
    scheduler: Any


def resumable(pipe: Any) -> bool:
    """Whether a run of ``pipe`` can be resumed exactly: its scheduler draws no noise."""
    scheduler = pipe.scheduler
    check = _DETERMINISTIC.get(type(scheduler).__name__)
    return check is not None and check(scheduler.config)


@torch.no_grad()
def generate_with_snapshots(
    pipe: Any, prompt: str, seeds: list[int], config: GenerationConfig, *, shared_steps: int
) -> tuple[torch.Tensor, list[Snapshot]]:
    """Images of ``seeds`` (as :func:`~fragjobs.generation.generate_images` makes them), and
    each batch's snapshot after ``shared_steps`` steps.

    Raises:
        InvalidInputError: ``shared_steps`` is not in [1, steps - 1], or the pipeline's
            scheduler is not :func:`resumable`.
    """
    normalise_prompt(prompt)
    seeds = check_seeds(seeds)
    _check(pipe, shared_steps, config)
    images, snapshots = [], []
    for start in range(0, len(seeds), config.batch_size):
        batch = tuple(seeds[start : start + config.batch_size])
        taken: list[Snapshot] = []

        def keep(pipeline: Any, i: int, _t: Any, kwargs: dict, batch=batch, taken=taken) -> dict:
            if i == shared_steps - 1:
                latents = kwargs["latents"].detach().clone()
                scheduler = copy.deepcopy(pipeline.scheduler)
                taken.append(Snapshot(batch, shared_steps, latents, scheduler))
            return kwargs

        out = pipeline_call(pipe, prompt, batch, config, "pt", callback_on_step_end=keep)
        images.append(out.float().cpu().clamp(0, 1))
        snapshots.extend(taken)
    return torch.cat(images), snapshots


@torch.no_grad()
def resume_latents(
    pipe: Any, prompt: str, snapshots: list[Snapshot], config: GenerationConfig
) -> torch.Tensor:
    """The final latents of ``pipe`` run on from each snapshot, in the snapshots' seed order.

    Raises:
        InvalidInputError: ``pipe``'s scheduler is not the snapshots' kind.
    """
    normalise_prompt(prompt)
    parts = []
    for snap in snapshots:
        if type(snap.scheduler) is not type(pipe.scheduler):
            raise InvalidInputError(
                f"a {type(snap.scheduler).__name__} snapshot cannot resume on a pipeline "
                f"with a {type(pipe.scheduler).__name__}"
            )
        resumed = copy.copy(pipe)
        # not setattr: a pipeline registers an assigned component in its config
        object.__setattr__(resumed, "scheduler", _Resumed(copy.deepcopy(snap.scheduler), snap.step))
        resumed.set_progress_bar_config(disable=True)
        out = pipeline_call(resumed, prompt, snap.seeds, config, "latent", latents=snap.latents)
        parts.append(out.detach().float().cpu())
    return torch.cat(parts)


class _Resumed:
    """A scheduler after ``step`` steps, as a pipeline's ``__call__`` sees it: setting the
    timesteps keeps its state, ``timesteps`` are the remaining ones, and the latents it is
    given are already scaled (``init_noise_sigma`` 1)."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler: Any, step: int) -> None:
        self._scheduler = scheduler
        self._step = step

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        """Keep the timesteps and the state of the run being resumed."""

    @property
    def timesteps(self) -> torch.Tensor:
        return self._scheduler.timesteps[self._step :]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)


def _check(pipe: Any, shared_steps: int, config: GenerationConfig) -> None:
    if isinstance(shared_steps, bool) or not isinstance(shared_steps, int):
        raise InvalidInputError(f"shared_steps must be an integer, got {shared_steps!r}")
    if not 1 <= shared_steps < config.steps:
        raise InvalidInputError(
            f"shared_steps must be in [1, {config.steps - 1}] for {config.steps} steps, "
            f"got {shared_steps}"
        )
    if not resumable(pipe):
        raise InvalidInputError(
            f"a run with a {type(pipe.scheduler).__name__} cannot be resumed exactly: "
            "its steps draw noise"
        )
