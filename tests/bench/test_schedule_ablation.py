"""The schedule ablation on the trained ``shapes`` pipeline (a few steps, two seeds): every
column, equal cost, exact where nothing is skipped."""

from __future__ import annotations

import pytest
import torch

from fragjobs.bench.schedule_ablation import (
    SOURCES,
    schedule_ablation,
    schedules_at_cost,
    sharing_break_even,
    summarise,
)
from fragjobs.bench.schedule_report import html_section, markdown_section
from fragjobs.builtin.configs import build_shapes
from fragjobs.errors import InvalidInputError
from fragjobs.extraction import BlockCachingConfig
from fragjobs.extraction.model_schedule import mean_block_time_ms
from fragjobs.generation import GenerationConfig, generate_images
from fragjobs.profiling import ProfileConfig, profile_prompt

PROMPTS = ("a red circle on the left", "a blue square at the top")
SEEDS = (100, 101)
# a budget so small that every block is recomputed at every step (cost 1.0), and one that skips
CONFIG = BlockCachingConfig(deltas=(1e-9, 0.3), shallow_deltas=(None,), warmup=0.2)


@pytest.fixture(scope="module")
def shapes_pipe():
    pipe = build_shapes()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def profiles(shapes_pipe):
    config = ProfileConfig(seeds=(0,), steps=6, guidance_scale=6.0, height=64, width=64)
    return {p: profile_prompt(shapes_pipe, p, config, progress=False) for p in PROMPTS}


def test_two_prompt_ablation_rows_have_every_column(shapes_pipe, profiles):
    gen = GenerationConfig(steps=6, guidance_scale=6.0, height=64, width=64, batch_size=2)
    before = generate_images(shapes_pipe, PROMPTS[0], list(SEEDS), gen)
    rows = schedule_ablation(
        shapes_pipe, profiles, height=64, width=64, targets=(1.0, 0.5), seeds=SEEDS, config=CONFIG
    )
    assert [(r["prompt"], r["target_cost"]) for r in rows] == [
        (p, t) for p in PROMPTS for t in (1.0, 0.5)
    ]
    times = mean_block_time_ms(list(profiles.values()))
    for row in rows:
        chosen = schedules_at_cost(
            row["prompt"], profiles, profiles, row["target_cost"], CONFIG, times
        )
        for source in SOURCES:
            entry = row[source]
            assert set(entry) == {
                "schedule",
                "cost",
                "recompute",
                "ssim",
                "ssim_worst",
                "delta_e_worst",
            }
            assert entry["cost"] == round(chosen[source].estimated_cost, 3)
            assert entry["recompute"] == {
                b: list(t) for b, t in sorted(chosen[source].recompute.items())
            }
            assert 0 <= entry["ssim_worst"] <= entry["ssim"] <= 1
            assert entry["delta_e_worst"] >= 0
        assert row["deepcache"]["schedule"].startswith("N=")
        if row["target_cost"] == 1.0:
            # every block recomputed at every step: exactly the full model
            for source in ("own", "other", "model_level"):
                assert row[source]["cost"] == 1.0
                assert row[source]["ssim"] == row[source]["ssim_worst"] == 1.0
            assert row["deepcache"]["cost"] < 1.0  # interval 2 at most: never the full model
        else:
            assert row["own"]["cost"] < 1.0
    # the hooks are gone afterwards: the pipeline makes the same images as before
    assert torch.equal(before, generate_images(shapes_pipe, PROMPTS[0], list(SEEDS), gen))

    summary = summarise(rows)
    assert summary["1.0"]["model_level_as_good"] is True
    assert summary["1.0"]["model_level_kept_own"] == 2
    assert summary["1.0"]["same_schedule_as_own"] == {"other": 2, "model_level": 2, "deepcache": 0}
    assert summary["1.0"]["own"]["ssim"] == 1.0
    ablation = {"seeds": list(SEEDS), "rows": rows, "summary": summary, "break_even": {}}
    text = "\n".join(markdown_section(ablation))
    assert text.count(PROMPTS[0]) == 2 and "Target cost 0.5:" in text
    section = html_section(ablation)
    assert len(section["rows"]) == 4 and all(
        len(r) == len(section["columns"]) for r in section["rows"]
    )


def test_a_model_level_schedule_needs_another_calibration_prompt(profiles):
    times = mean_block_time_ms(list(profiles.values()))
    only_self = {PROMPTS[0]: profiles[PROMPTS[0]]}
    with pytest.raises(InvalidInputError, match="calibration prompts other than it"):
        schedules_at_cost(PROMPTS[0], profiles, only_self, 0.5, CONFIG, times)
    with pytest.raises(InvalidInputError, match="at least two"):
        schedules_at_cost(PROMPTS[0], only_self, profiles, 0.5, CONFIG, times)


def test_sharing_break_even_splits_the_runs_by_the_fragment_that_made_them():
    def summary(prompt, used, variants):
        return {
            "prompt": prompt,
            "model_level": None if used is None else {"used": used},
            "hypotheses": {"H5": {"values": {"break_even_variants": variants}}},
        }

    result = sharing_break_even(
        [
            summary("a", True, 3.04),
            summary("b", True, 5.0),
            summary("c", False, 40.0),
            summary("d", None, None),  # the prompt's own chain; its fragment failed the gate
        ]
    )
    assert result["runs"] == [
        {"prompt": "a", "model_level_used": True, "break_even": 3.0},
        {"prompt": "b", "model_level_used": True, "break_even": 5.0},
        {"prompt": "c", "model_level_used": False, "break_even": 40.0},
        {"prompt": "d", "model_level_used": False, "break_even": None},
    ]
    assert result["model_level_runs"] == 2
    assert result["median_model_level"] == 4.0 and result["median_own"] == 40.0
