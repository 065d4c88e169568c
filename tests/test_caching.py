"""Block caching: planned from profiled block changes, hooks removable and reset per generation."""

from __future__ import annotations

import copy

import pytest
import torch

from fragjobs.errors import InvalidInputError
from fragjobs.extraction import (
    BlockCachingConfig,
    CachingSchedule,
    apply_block_caching,
    plan_block_caching,
    remove_block_caching,
)
from fragjobs.generation import GenerationConfig, generate_images, with_unet

GEN = GenerationConfig(steps=6, guidance_scale=7.5, height=64, width=64, batch_size=2)
PROMPT = "a red circle on the left"


def test_plan_accumulates_change_until_delta():
    changes = {"a": [0.1, 0.1, 0.1, 0.5, 0.05], "b": [1.0, 1.0, 1.0, 1.0, 1.0]}
    schedule = plan_block_caching(changes, {"a": 3.0, "b": 1.0}, steps=6, delta=0.25)
    assert schedule.recompute["a"] == (0, 3, 4)  # 0.3 > 0.25 at t=3, 0.5 at t=4
    assert schedule.recompute["b"] == (0, 1, 2, 3, 4, 5)
    assert schedule.estimated_cost == pytest.approx((3.0 * 3 / 6 + 1.0 * 6 / 6) / 4.0)
    with pytest.raises(InvalidInputError, match="same number of steps"):
        plan_block_caching(changes, {}, steps=8, delta=0.25)
    with pytest.raises(InvalidInputError):
        BlockCachingConfig(min_ssim=0)


def _every_block(unet, steps):
    from fragjobs.profiling import unet_blocks

    return {name: steps for name in unet_blocks(unet)}


def test_recomputing_every_step_is_exact_and_removal_restores(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    full = generate_images(tiny_pipe, PROMPT, [1, 2], GEN)
    always = CachingSchedule(6, _every_block(unet, (0, 1, 2, 3, 4, 5)), 0.0, 1.0)
    apply_block_caching(unet, always)
    assert torch.equal(generate_images(with_unet(tiny_pipe, unet), PROMPT, [1, 2], GEN), full)
    sparse = CachingSchedule(6, _every_block(unet, (0, 3)), 1.0, 0.33)
    apply_block_caching(unet, sparse)
    cached_pipe = with_unet(tiny_pipe, unet)
    first = generate_images(cached_pipe, PROMPT, [1, 2], GEN)
    second = generate_images(cached_pipe, PROMPT, [1, 2], GEN)
    assert not torch.allclose(first, full, atol=1e-3)  # blocks really skipped
    assert torch.equal(first, second)  # state resets at each new generation
    remove_block_caching(unet)
    assert torch.equal(generate_images(with_unet(tiny_pipe, unet), PROMPT, [1, 2], GEN), full)


def test_skipped_steps_do_not_run_the_block(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    calls = []
    unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    schedule = CachingSchedule(6, {"mid_block": (0, 2, 4)}, 1.0, 0.5)
    apply_block_caching(unet, schedule)
    generate_images(with_unet(tiny_pipe, unet), PROMPT, [1], GEN)
    assert len(calls) == 3
    with pytest.raises(InvalidInputError, match="unknown blocks"):
        apply_block_caching(unet, CachingSchedule(6, {"nope": (0,)}, 1.0, 0.5))
