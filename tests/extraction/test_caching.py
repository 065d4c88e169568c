"""Block caching: planned from profiled block changes, hooks removable and reset per generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fragjobs.errors import InvalidInputError
from fragjobs.extraction import (
    BlockCachingConfig,
    CachingSchedule,
    apply_block_caching,
    candidate_schedules,
    plan_block_caching,
    remove_block_caching,
)
from fragjobs.generation import GenerationConfig, generate_images, with_unet

GEN = GenerationConfig(steps=6, guidance_scale=7.5, height=64, width=64, batch_size=2)
PROMPT = "a red circle on the left"


UP = "up_blocks"


def _changes(level0, level1, level2):
    """Block changes of a 3-level UNet whose levels follow the given signals."""
    signals = {0: level0, 1: level1, 2: level2}
    names = {
        "down_blocks.0": 0,
        "down_blocks.1": 1,
        "down_blocks.2": 2,
        "mid_block": 2,
        f"{UP}.0": 2,
        f"{UP}.1": 1,
        f"{UP}.2": 0,
    }
    return {name: list(signals[level]) for name, level in names.items()}


def test_plan_nests_levels_and_accumulates_change_until_the_budget():
    changes = _changes(
        level0=[0.1, 0.1, 0.1, 0.5, 0.05], level1=[0.2] * 5, level2=[0.05, 0.05, 0.3, 0.05, 0.3]
    )
    times = {name: 1.0 for name in changes}
    schedule = plan_block_caching(changes, times, steps=6, delta=0.25, shallow_delta=0.25)
    rec = schedule.recompute
    assert rec["down_blocks.0"] == rec[f"{UP}.2"] == (0, 3, 4)  # 0.3 > 0.25 at t=3, 0.5 at 4
    # level 1 would recompute at t=2 (0.4 > 0.25) but may only use level 0's steps: t=3
    assert rec["down_blocks.1"] == rec[f"{UP}.1"] == (0, 3)
    # level 2 (budget 0.5): 0.4 by t=3 is not enough, 0.75 at t=5 is not one of level 1's
    assert rec["down_blocks.2"] == rec["mid_block"] == rec[f"{UP}.0"] == (0,)
    assert schedule.estimated_cost == pytest.approx((2 * 3 + 2 * 2 + 3 * 1) / 6 / 7)
    # level 0 every step (DeepCache-like) and a warm-up that always computes
    deep = plan_block_caching(changes, times, steps=6, delta=0.25, warmup_steps=3)
    assert deep.recompute["down_blocks.0"] == (0, 1, 2, 3, 4, 5)
    assert deep.recompute[f"{UP}.1"] == (0, 1, 2, 4)
    assert all(0 in s and 1 in s and 2 in s for s in deep.recompute.values())
    with pytest.raises(InvalidInputError, match="same number of steps"):
        plan_block_caching(changes, {}, steps=8, delta=0.25)
    with pytest.raises(InvalidInputError, match="not the block names of a supported denoiser"):
        plan_block_caching({"a": [0.1] * 5}, {}, steps=6, delta=0.25)
    assert BlockCachingConfig(warmup=0.2).warmup_steps(20) == 4
    assert BlockCachingConfig(warmup=0.0).warmup_steps(20) == 1  # step 0 always computes
    bad_configs = (
        {"min_ssim": 0},
        {"deltas": ()},
        {"deltas": (0.1, -1)},
        {"max_trials": 0},
        {"warmup": 1.0},
        {"shallow_deltas": (None, 0)},
        {"cost_tolerance": -0.1},
        {"cost_tolerance": 1.0},
    )
    for bad in bad_configs:
        with pytest.raises(InvalidInputError):
            BlockCachingConfig(**bad)


def test_candidates_are_distinct_and_sorted_by_estimated_cost():
    changes = _changes(
        [0.3, 0.2, 0.1, 0.1, 0.05], [0.4, 0.2, 0.2, 0.1, 0.1], [0.5, 0.1] + [0.1] * 3
    )
    times = {name: float(i + 1) for i, name in enumerate(changes)}
    found = candidate_schedules(changes, times, 6, BlockCachingConfig())
    costs = [s.estimated_cost for s in found]
    assert costs == sorted(costs)
    assert len({tuple(sorted(s.recompute.items())) for s in found}) == len(found)
    assert found[-1].shallow_delta is None  # computing level 0 every step costs most


def _every_block(unet, steps):
    from fragjobs.profiling import denoiser_blocks

    return {name: steps for name in denoiser_blocks(unet)}


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


def test_schedule_round_trips_through_the_manifest_layer():
    from fragjobs.extraction import caching_schedule
    from fragjobs.extraction.caching import routing_layer
    from fragjobs.manifest import FragmentManifest

    schedule = CachingSchedule(
        6,
        {"mid_block": (0, 2, 4), "up_blocks.0": (0, 1, 2, 3, 4, 5)},
        0.25,
        0.6,
        shallow_delta=0.4,
        warmup_steps=2,
    )
    config = BlockCachingConfig()
    layer = routing_layer(schedule, [], config)
    assert layer.enabled and layer.schedule == {"mid_block": [0, 2, 4], UP + ".0": list(range(6))}
    manifest = FragmentManifest.model_construct(dynamic_routing=layer)
    assert caching_schedule(manifest) == schedule
    off = routing_layer(None, [{"delta": 0.1}], config)
    assert not off.enabled and "SSIM >= 0.9" in off.reason
    assert caching_schedule(FragmentManifest.model_construct(dynamic_routing=off)) is None


def test_candidates_above_a_floor_each_compute_more_than_it():
    changes = _changes(
        [0.3, 0.2, 0.1, 0.1, 0.05], [0.4, 0.2, 0.2, 0.1, 0.1], [0.5, 0.1] + [0.1] * 3
    )
    times = {name: float(i + 1) for i, name in enumerate(changes)}
    free = candidate_schedules(changes, times, 6, BlockCachingConfig())
    failed = free[len(free) // 2]
    config = BlockCachingConfig(floor=tuple(failed.recompute.items()))
    found = candidate_schedules(changes, times, 6, config)
    assert found and [s.estimated_cost for s in found] == sorted(s.estimated_cost for s in found)
    signatures = [tuple(sorted(s.recompute.items())) for s in found]
    assert tuple(sorted(failed.recompute.items())) not in signatures
    assert len(set(signatures)) == len(found)
    for schedule in found:
        assert schedule.estimated_cost > failed.estimated_cost
        for block, steps in failed.recompute.items():
            assert set(steps) <= set(schedule.recompute[block])
        rec = schedule.recompute  # still nested: a deeper level runs only where shallower do
        assert set(rec["down_blocks.2"]) <= set(rec["down_blocks.1"]) <= set(rec["down_blocks.0"])
    # the floor is part of the key's params only when set, and survives JSON
    assert "floor" not in BlockCachingConfig().params()
    again = BlockCachingConfig(floor=json.loads(json.dumps(config.params()))["floor"])
    assert again.floor == config.floor
    with pytest.raises(InvalidInputError, match="beyond 6 steps"):
        candidate_schedules(changes, times, 6, BlockCachingConfig(floor={"mid_block": (0, 6)}))
    for bad in ({"mid_block": (0, -1)}, {"mid_block": ("x",)}, ("mid_block",)):
        with pytest.raises(InvalidInputError, match="floor"):
            BlockCachingConfig(floor=bad)
