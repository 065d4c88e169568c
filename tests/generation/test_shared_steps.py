"""Shared steps: a run resumed from a snapshot ends exactly where the whole run ends.

Real tiny-sd pipelines (random weights, DPM-Solver++ multistep, the built-ins' scheduler)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from fragjobs.errors import InvalidInputError
from fragjobs.generation import GenerationConfig, generate_images
from fragjobs.generation.generate import generate_latents
from fragjobs.generation.shared_steps import generate_with_snapshots, resumable, resume_latents

PROMPT = "a red circle on the left"
GEN = GenerationConfig(steps=6, guidance_scale=5.0, height=64, width=64, batch_size=2)


@pytest.mark.parametrize("shared", [1, 3, 5])
def test_resuming_the_full_model_gives_its_whole_run_exactly(tiny_pipe, shared):
    seeds = [0, 1, 7]  # two batches, the second of one seed
    images, snapshots = generate_with_snapshots(tiny_pipe, PROMPT, seeds, GEN, shared_steps=shared)
    assert [s.seeds for s in snapshots] == [(0, 1), (7,)]
    assert all(s.step == shared for s in snapshots)
    # the snapshots leave the run itself unchanged
    assert torch.equal(images, generate_images(tiny_pipe, PROMPT, seeds, GEN))
    resumed = resume_latents(tiny_pipe, PROMPT, snapshots, GEN)
    assert torch.equal(resumed, generate_latents(tiny_pipe, PROMPT, seeds, GEN))


def test_a_resume_runs_only_the_remaining_steps(tiny_pipe):
    _, snapshots = generate_with_snapshots(tiny_pipe, PROMPT, [0], GEN, shared_steps=4)
    calls = []
    handle = tiny_pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        resume_latents(tiny_pipe, PROMPT, snapshots, GEN)
    finally:
        handle.remove()
    assert len(calls) == GEN.steps - 4


@pytest.mark.parametrize("shared", [0, 6, True, 2.0])
def test_shared_steps_out_of_range_are_refused(tiny_pipe, shared):
    with pytest.raises(InvalidInputError, match="shared_steps"):
        generate_with_snapshots(tiny_pipe, PROMPT, [0], GEN, shared_steps=shared)


def test_a_scheduler_that_draws_noise_is_refused(tiny_pipe):
    noisy = copy.copy(tiny_pipe)
    sde = DPMSolverMultistepScheduler.from_config(
        tiny_pipe.scheduler.config, algorithm_type="sde-dpmsolver++"
    )
    object.__setattr__(noisy, "scheduler", sde)
    assert resumable(tiny_pipe) and not resumable(noisy)
    with pytest.raises(InvalidInputError, match="draw noise"):
        generate_with_snapshots(noisy, PROMPT, [0], GEN, shared_steps=2)


def test_a_snapshot_resumes_only_on_its_kind_of_scheduler(tiny_pipe):
    _, snapshots = generate_with_snapshots(tiny_pipe, PROMPT, [0], GEN, shared_steps=2)
    other = copy.copy(tiny_pipe)
    object.__setattr__(other, "scheduler", DDPMScheduler())
    with pytest.raises(InvalidInputError, match="cannot resume"):
        resume_latents(other, PROMPT, snapshots, GEN)
