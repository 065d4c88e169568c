"""The schedule ablation: does a prompt's own caching schedule beat a shared one?

A fragment's speed comes from its block-caching schedule. For each prompt, at equal estimated
cost (each source's candidate nearest a common target fraction of the UNet's block time), the
images of four schedules are compared with the full model's on seeds no profile saw:

* ``own``: planned from the prompt's own profile (its per-block step changes);
* ``other``: planned from another prompt's profile;
* ``model_level``: planned from the block changes averaged over *other* prompts' profiles
  (Block Caching's once-per-model calibration; the evaluated prompt is left out);
* ``deepcache``: DeepCache at block granularity (shallowest level every step, deeper levels
  every N steps), through the same hooks (:func:`~fragjobs.extraction.model_schedule.
  uniform_schedule`), not the ``deepcache`` package.

Every schedule runs with plain reuse (a cached block returns its last output) and is costed
with one block-time table (the calibration profiles' mean), so the rows differ only in where
the schedule came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fragjobs.errors import InvalidInputError
from fragjobs.extraction import (
    BlockCachingConfig,
    CachingSchedule,
    apply_block_caching,
    candidate_schedules,
    remove_block_caching,
)
from fragjobs.extraction.model_schedule import (
    closest_to_cost,
    mean_block_time_ms,
    model_level_candidates,
    uniform_candidates,
)
from fragjobs.families import denoiser
from fragjobs.generation import GenerationConfig, generate_images
from fragjobs.profiling import PromptProfile
from fragjobs.validation import compute_quality

SOURCES = ("own", "other", "model_level", "deepcache")
SOURCE_TITLES = {
    "own": "own schedule",
    "other": "another prompt's",
    "model_level": "model-level",
    "deepcache": "DeepCache (uniform)",
}
TARGET_COSTS = (0.35, 0.5)
EVAL_SEEDS = tuple(range(100, 108))
# a mean-SSIM gap smaller than this is reported as "as good"
SAME_SSIM = 0.005


def schedules_at_cost(
    prompt: str,
    profiles: Mapping[str, PromptProfile],
    calibration: Mapping[str, PromptProfile],
    target_cost: float,
    config: BlockCachingConfig,
    block_time_ms: Mapping[str, float],
) -> dict[str, CachingSchedule]:
    """Each source's schedule for ``prompt`` nearest ``target_cost`` (see the module doc).

    ``other`` is the next prompt of ``profiles`` (cyclically); ``model_level`` is calibrated
    on ``calibration`` without ``prompt``.

    Raises:
        InvalidInputError: ``prompt`` not in ``profiles``, fewer than two prompts, or no
            calibration prompt other than ``prompt``.
    """
    prompts = list(profiles)
    if prompt not in profiles or len(prompts) < 2:
        raise InvalidInputError(
            f"the ablation needs {prompt!r} among at least two profiled prompts, got {prompts}"
        )
    others = [p for q, p in calibration.items() if q != prompt]
    if not others:
        raise InvalidInputError(
            f"a model-level schedule for {prompt!r} needs calibration prompts other than it"
        )
    own = profiles[prompt]
    other = profiles[prompts[(prompts.index(prompt) + 1) % len(prompts)]]
    steps, times = own.config.steps, dict(block_time_ms)

    def nearest(profile: PromptProfile) -> CachingSchedule:
        changes = profile.mean_block_change()
        return closest_to_cost(candidate_schedules(changes, times, steps, config), target_cost)

    return {
        "own": nearest(own),
        "other": nearest(other),
        "model_level": closest_to_cost(
            model_level_candidates(others, config, block_time_ms=times), target_cost
        ),
        "deepcache": closest_to_cost(uniform_candidates(times, steps), target_cost),
    }


def describe(source: str, schedule: CachingSchedule) -> str:
    """A short label of a schedule's budgets (DeepCache: its interval)."""
    if source == "deepcache":
        return f"N={round(schedule.delta + 0.5)}"
    shallow = "every step" if schedule.shallow_delta is None else f"{schedule.shallow_delta:g}"
    return f"delta={schedule.delta:g}, shallow={shallow}"


@torch.no_grad()
def schedule_ablation(
    pipe: Any,
    profiles: Mapping[str, PromptProfile],
    *,
    height: int,
    width: int,
    calibration: Mapping[str, PromptProfile] | None = None,
    targets: Sequence[float] = TARGET_COSTS,
    seeds: Sequence[int] = EVAL_SEEDS,
    config: BlockCachingConfig | None = None,
    prompts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """SSIM against the full model of each source's schedule, one row per prompt and target.

    Args:
        pipe: the base pipeline (its UNet gets each schedule's hooks in turn, removed after).
        profiles: the evaluated prompts' profiles (same model, same steps), in order.
        height, width: image size, as profiled.
        calibration: the prompts the model-level schedule is calibrated on (the evaluated
            prompt is always left out); default ``profiles``.
        targets: target estimated costs, fractions of the UNet's block time.
        seeds: evaluation seeds (the profiles' seeds should not be among them).
        config: candidate budgets (default :class:`BlockCachingConfig`).
        prompts: the prompts evaluated, among ``profiles`` (default all of them).

    Returns:
        Rows ``{"prompt", "target_cost", <source>: {"schedule", "cost", "recompute",
        "ssim", "ssim_worst", "delta_e_worst"}}`` for each source in :data:`SOURCES`
        (``recompute``: block → the steps it is recomputed at).
    """
    config = config or BlockCachingConfig()
    calibration = dict(calibration if calibration is not None else profiles)
    times = mean_block_time_ms(list(calibration.values()))
    rows = []
    for prompt in list(profiles) if prompts is None else prompts:
        if prompt not in profiles:
            raise InvalidInputError(f"no profile of {prompt!r} among {list(profiles)}")
        profile = profiles[prompt]
        gen = GenerationConfig(
            steps=profile.config.steps,
            guidance_scale=profile.config.guidance_scale,
            height=height,
            width=width,
            batch_size=len(seeds),
        )
        remove_block_caching(denoiser(pipe))
        full = generate_images(pipe, prompt, list(seeds), gen)
        measured: dict[tuple, dict[str, float]] = {}  # one generation per distinct schedule
        for target in targets:
            chosen = schedules_at_cost(prompt, profiles, calibration, target, config, times)
            row: dict[str, Any] = {"prompt": prompt, "target_cost": target}
            for source, schedule in chosen.items():
                signature = tuple(sorted(schedule.recompute.items()))
                if signature not in measured:
                    measured[signature] = _measure(pipe, schedule, prompt, seeds, gen, full)
                row[source] = {
                    "schedule": describe(source, schedule),
                    "cost": round(schedule.estimated_cost, 3),
                    "recompute": {b: list(t) for b, t in signature},
                    **measured[signature],
                }
            rows.append(row)
    return rows


def _measure(pipe, schedule, prompt, seeds, gen, full) -> dict[str, float]:
    apply_block_caching(denoiser(pipe), schedule)
    try:
        images = generate_images(pipe, prompt, list(seeds), gen)
    finally:
        remove_block_caching(denoiser(pipe))
    quality = compute_quality(full, images, prompt)
    return {
        "ssim": round(quality.ssim, 4),
        "ssim_worst": round(min(quality.ssim_per_image), 4),
        "delta_e_worst": (
            None
            if not quality.colour_delta_e_per_image
            else round(max(quality.colour_delta_e_per_image), 2)
        ),
    }


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per target cost and source: mean cost, mean SSIM, mean and lowest worst-seed SSIM;
    per target how many prompts each source chose the very schedule the own one did, on how
    many the model-level schedule kept the own one's mean SSIM (within :data:`SAME_SSIM`),
    and whether it is as good overall."""
    out: dict[str, Any] = {}
    for target in sorted({r["target_cost"] for r in rows}):
        at = [r for r in rows if r["target_cost"] == target]
        sources = {
            source: {
                "cost": round(sum(r[source]["cost"] for r in at) / len(at), 3),
                "ssim": round(sum(r[source]["ssim"] for r in at) / len(at), 4),
                "ssim_worst": round(sum(r[source]["ssim_worst"] for r in at) / len(at), 4),
                "ssim_worst_min": min(r[source]["ssim_worst"] for r in at),
            }
            for source in SOURCES
        }
        own, shared = sources["own"], sources["model_level"]
        out[str(target)] = {
            **sources,
            "prompts": len(at),
            "same_schedule_as_own": {
                s: sum(r[s].get("recompute") == r["own"].get("recompute") for r in at)
                for s in SOURCES[1:]
                if all("recompute" in r[s] for r in at)
            },
            "model_level_kept_own": sum(
                r["model_level"]["ssim"] >= r["own"]["ssim"] - SAME_SSIM for r in at
            ),
            "model_level_as_good": shared["ssim"] >= own["ssim"] - SAME_SSIM
            and shared["ssim_worst"] >= own["ssim_worst"] - SAME_SSIM,
        }
    return out


def sharing_break_even(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Break-even of the page's runs, split by whether the base's model-level fragment made
    their variants (``metrics_summary.json``'s ``model_level.used``): measured, not estimated.

    Returns:
        ``{"runs": [{"prompt", "model_level_used", "break_even"}], "median_model_level",
        "median_own", "model_level_runs"}`` (break-evens in variants, the delivered
        definition; None where a run has none: its fragment never paid back or failed).
    """
    runs = []
    for summary in summaries:
        values = (summary.get("hypotheses") or {}).get("H5", {}).get("values", {})
        variants = values.get("break_even_variants")
        runs.append(
            {
                "prompt": summary.get("prompt"),
                "model_level_used": bool((summary.get("model_level") or {}).get("used")),
                "break_even": None if variants is None else round(variants, 1),
            }
        )
    shared = [r["break_even"] for r in runs if r["model_level_used"]]
    return {
        "runs": runs,
        "model_level_runs": sum(r["model_level_used"] for r in runs),
        "median_model_level": _median(shared),
        "median_own": _median([r["break_even"] for r in runs if not r["model_level_used"]]),
    }


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else round((known[mid - 1] + known[mid]) / 2, 1)


def schedule_ablation_document(
    pipe: Any,
    profiles: Mapping[str, PromptProfile],
    *,
    height: int,
    width: int,
    calibration: Mapping[str, PromptProfile] | None = None,
    run_summaries: Sequence[dict[str, Any]] = (),
    targets: Sequence[float] = TARGET_COSTS,
    seeds: Sequence[int] = EVAL_SEEDS,
) -> dict[str, Any]:
    """The ablation as the results page stores it: ``{"seeds", "targets", "rows",
    "summary", "break_even"}`` (break-even from the runs' ``metrics_summary.json``)."""
    rows = schedule_ablation(
        pipe,
        profiles,
        height=height,
        width=width,
        calibration=calibration,
        targets=targets,
        seeds=seeds,
    )
    return {
        "seeds": list(seeds),
        "targets": list(targets),
        "rows": rows,
        "summary": summarise(rows),
        "break_even": sharing_break_even(run_summaries),
    }
