"""The routing search: trials stop at the first failing seed; the switches reach the result."""

from __future__ import annotations

import copy

import pytest

from fragjobs.base_models import load_base
from fragjobs.extraction.caching import BlockCachingConfig, remove_block_caching, routing_layer
from fragjobs.extraction.caching import search_block_caching as search
from fragjobs.profiling import ProfileConfig, profile_prompt

PROMPT = "a green star on the right"


@pytest.fixture(scope="module")
def tiny_profile(tiny_pipe):
    config = ProfileConfig(seeds=(5, 6, 7), steps=8, guidance_scale=7.5, height=64, width=64)
    return profile_prompt(tiny_pipe, PROMPT, config, progress=False)


def test_a_trial_stops_at_the_first_seed_below_the_fidelity(tiny_pipe, tiny_profile):
    unet = copy.deepcopy(tiny_pipe.unet)
    config = BlockCachingConfig(min_ssim=1.0, deltas=(0.1, 1.0), shallow_deltas=(0.4,))
    schedule, rows = search(tiny_pipe, unet, tiny_profile, config, height=64, width=64)
    assert schedule is None and rows
    assert all(row["seeds"] == 1 for row in rows)  # one seed generated, not three
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in [unet])


def test_the_switched_on_parts_are_searched_and_recorded(tiny_pipe, tiny_profile):
    unet = copy.deepcopy(tiny_pipe.unet)
    config = BlockCachingConfig(
        min_ssim=0.01,
        deltas=(1.0,),
        shallow_deltas=(None,),
        warmup=0.25,
        forecast=True,
        cfg_reuse=True,
        probe=True,
        max_trials=2,
    )
    schedule, rows = search(tiny_pipe, unet, tiny_profile, config, height=64, width=64)
    assert schedule is not None and rows[0]["seeds"] == 3  # passed: every seed generated
    assert set(schedule.forecast_orders) == {"up_blocks.0", "up_blocks.1"}
    assert schedule.probe_margin is not None and len(schedule.probe_change) == 7
    layer = routing_layer(schedule, rows, config)
    assert layer.forecast_orders == schedule.forecast_orders
    assert layer.probe_margin == schedule.probe_margin
    assert (layer.cfg_steps or []) == list(schedule.cfg_steps)
    remove_block_caching(unet)


def test_after_a_failure_no_looser_candidate_is_tried():
    """Budgets at least a failed candidate's at every level let each level drift as far:
    the search spends no trial on them, whatever their estimated cost. On the trained
    shapes model at a high fidelity, the trials this saves find a schedule (a search
    without this rule tried looser candidates, ran out of trials and kept none)."""
    pipe = load_base("shapes").pipe
    pipe.set_progress_bar_config(disable=True)
    profile = profile_prompt(
        pipe,
        "a small blue cross on the right over a white background",
        ProfileConfig(seeds=(0, 1), steps=12, guidance_scale=7.5, height=64, width=64),
        progress=False,
    )
    config = BlockCachingConfig(min_ssim=0.9995)
    schedule, rows = search(pipe, pipe.unet, profile, config, height=64, width=64)
    failed = []
    for row in rows:
        for earlier in failed:
            looser = row["delta"] >= earlier["delta"] and (row["shallow_delta"] or 0.0) >= (
                earlier["shallow_delta"] or 0.0
            )
            assert not looser, (row, earlier)
        if row["ssim_min"] < config.min_ssim:
            failed.append(row)
    assert failed and schedule is not None
    remove_block_caching(pipe.unet)
