"""Model-level and uniform caching schedules, from known block changes (no model needed)."""

from __future__ import annotations

import pytest
import torch

from fragjobs.errors import InvalidInputError
from fragjobs.extraction import BlockCachingConfig, candidate_schedules, plan_block_caching
from fragjobs.extraction.model_schedule import (
    closest_to_cost,
    mean_block_change,
    mean_block_time_ms,
    model_level_candidates,
    model_level_schedule,
    uniform_candidates,
    uniform_schedule,
)
from fragjobs.profiling import ProfileConfig, PromptProfile

STEPS = 10
BLOCKS = ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")
TIMES = {"down_blocks.0": 1.0, "down_blocks.1": 2.0, "mid_block": 1.0}
TIMES |= {"up_blocks.0": 2.0, "up_blocks.1": 4.0}


def profile_with(prompt: str, per_seed: dict[str, list[list[float]]], times=TIMES):
    """A profile holding only block changes ``(seeds, steps - 1)`` and block times."""
    return PromptProfile(
        prompt=prompt,
        config=ProfileConfig(seeds=tuple(range(len(next(iter(per_seed.values()))))), steps=STEPS),
        head_kind={},
        energy={},
        block_change={b: torch.tensor(v) for b, v in per_seed.items()},
        layer_time_ms=dict(times),
    )


def constant(value: float, seeds: int = 2) -> list[list[float]]:
    return [[value] * (STEPS - 1) for _ in range(seeds)]


def test_model_level_averages_the_prompts_block_changes_and_plans_from_them():
    fast = profile_with("fast", {b: constant(0.6) for b in BLOCKS})
    # seeds differ: the prompt's own change is the mean over its seeds (0.1 and 0.3 → 0.2)
    slow = profile_with("slow", {b: [[0.1] * 9, [0.3] * 9] for b in BLOCKS})
    assert mean_block_change([fast, slow]) == {b: [0.4] * 9 for b in BLOCKS}
    assert mean_block_time_ms([fast, slow]) == TIMES

    config = BlockCachingConfig(deltas=(0.5,), shallow_deltas=(None,), warmup=0.1)
    shared = model_level_schedule([fast, slow], target_cost=0.5, config=config)
    # level 1 (budget 0.5) accumulates 0.4 per step: recomputed every 2nd step after warm-up
    assert shared.recompute["down_blocks.1"] == (0, 2, 4, 6, 8)
    assert shared.recompute["up_blocks.0"] == (0, 2, 4, 6, 8)
    assert shared.recompute["up_blocks.1"] == tuple(range(STEPS))  # level 0 every step
    assert shared == plan_block_caching(
        {b: [0.4] * 9 for b in BLOCKS}, TIMES, STEPS, 0.5, shallow_delta=None, warmup_steps=1
    )
    # deterministic, and not the plan of either prompt alone
    assert model_level_schedule([fast, slow], target_cost=0.5, config=config) == shared
    assert model_level_schedule([fast], 0.5, config).recompute["mid_block"] == tuple(range(10))
    assert model_level_schedule([slow], 0.5, config).recompute["mid_block"] == (0, 3, 6, 9)


def test_model_level_candidates_are_costed_with_the_given_block_times():
    a = profile_with("a", {b: constant(0.2) for b in BLOCKS})
    b = profile_with("b", {b: constant(0.6) for b in BLOCKS}, times={k: 1.0 for k in TIMES})
    config = BlockCachingConfig()
    own_times = model_level_candidates([a, b], config)
    uniform_times = model_level_candidates([a, b], config, block_time_ms={k: 1.0 for k in TIMES})
    assert [s.recompute for s in own_times] != [] and all(
        s.block_time_ms == {k: (v + 1.0) / 2 for k, v in TIMES.items()} for s in own_times
    )
    assert all(s.block_time_ms == {k: 1.0 for k in TIMES} for s in uniform_times)
    assert {tuple(sorted(s.recompute.items())) for s in own_times} == {
        tuple(sorted(s.recompute.items())) for s in uniform_times
    }


def test_profiles_that_disagree_are_refused():
    a = profile_with("a", {b: constant(0.2) for b in BLOCKS})
    other_blocks = profile_with("b", {b: constant(0.2) for b in BLOCKS[:-1]})
    with pytest.raises(InvalidInputError, match="profiles disagree"):
        mean_block_change([a, other_blocks])
    with pytest.raises(InvalidInputError, match="at least one"):
        model_level_schedule([], 0.5)


def test_closest_to_cost_picks_the_nearest_estimate_and_the_cheaper_on_a_tie():
    changes = {b: [0.1, 0.5, 0.05, 0.3, 0.2, 0.1, 0.05, 0.4, 0.1] for b in BLOCKS}
    candidates = candidate_schedules(changes, TIMES, STEPS, BlockCachingConfig())
    costs = [s.estimated_cost for s in candidates]
    assert len(set(costs)) > 3
    for target in (0.05, 0.3, 0.42, 0.5, 0.77, 1.0):
        chosen = closest_to_cost(candidates, target)
        best = min(abs(c - target) for c in costs)
        assert abs(chosen.estimated_cost - target) == best
    low, high = candidates[0], candidates[-1]
    middle = (low.estimated_cost + high.estimated_cost) / 2
    assert closest_to_cost([high, low], middle) is low
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(InvalidInputError, match="target_cost"):
            closest_to_cost(candidates, bad)
    with pytest.raises(InvalidInputError, match="no candidate"):
        closest_to_cost([], 0.5)


def test_uniform_schedule_is_deepcache_at_block_granularity():
    schedule = uniform_schedule(TIMES, STEPS, 3)
    for block in ("down_blocks.0", "up_blocks.1"):  # level 0
        assert schedule.recompute[block] == tuple(range(STEPS))
    for block in ("down_blocks.1", "mid_block", "up_blocks.0"):  # level 1
        assert schedule.recompute[block] == (0, 3, 6, 9)
    total = sum(TIMES.values())
    assert schedule.estimated_cost == pytest.approx((5.0 + 5.0 * 4 / STEPS) / total, abs=1e-6)
    candidates = uniform_candidates(TIMES, STEPS)
    assert [s.estimated_cost for s in candidates] == sorted(s.estimated_cost for s in candidates)
    assert candidates[-1].recompute["mid_block"] == tuple(range(0, STEPS, 2))
    assert candidates[0].recompute["mid_block"] == (0,)  # interval = steps: only step 0
    with pytest.raises(InvalidInputError, match="interval"):
        uniform_schedule(TIMES, STEPS, 0)
