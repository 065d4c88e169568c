"""A model-level fragment: one caching schedule for a base, calibrated on many prompts.

Block Caching (Wimbauer et al., CVPR 2024) calibrates its schedule once per model. Here the
candidates are planned from the block changes averaged over the calibration prompts'
profiles (:func:`~fragjobs.extraction.model_schedule.model_level_candidates`) and searched
against the full model's images of *every* calibration prompt: the schedule kept is the
cheapest one found whose worst profiling seed keeps ``min_ssim`` on each prompt.

:func:`search_shared_schedule` does that prompt by prompt with
:func:`~fragjobs.extraction.caching.search_block_caching`: the first prompt bisects all
candidates; each next prompt first tries the schedule kept so far and, when it fails, searches
only the candidates that recompute everything the kept one does (recomputing more cannot
fail a prompt the kept one passed, up to noise); the prompts it passed before a change are
tried again until every prompt has passed the one kept (at most :data:`MAX_ROUNDS` passes).

:func:`extract_model_level_fragment` builds the fragment: no head pruning (which heads matter
is a prompt's own question, and pruning flipped unseen seeds' layouts: issue 16), the int8
and low-rank edits as configured, then the shared schedule. Its manifest is an ordinary
fragment manifest (its profiling layer is the first calibration prompt's, so it validates
like any fragment); the calibration prompts are in its catalog ``params``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fragjobs.base_identity import BaseModelInfo
from fragjobs.errors import InvalidInputError
from fragjobs.extraction.caching import (
    BlockCachingConfig,
    CachingSchedule,
    apply_block_caching,
    remove_block_caching,
    routing_layer,
    search_block_caching,
)
from fragjobs.extraction.fidelity import reference_images
from fragjobs.extraction.fragment import ExtractionConfig, Fragment, extract_fragment
from fragjobs.extraction.heads import HeadSelectionConfig
from fragjobs.extraction.model_schedule import mean_block_time_ms, model_level_candidates
from fragjobs.profiling import PromptProfile

log = logging.getLogger("fragjobs")

MAX_ROUNDS = 3
"""Passes over the calibration prompts before the search gives up on agreeing."""


def _covers(schedule: CachingSchedule, other: CachingSchedule) -> bool:
    """Whether ``schedule`` recomputes every block at every step ``other`` does."""
    return all(
        set(steps) <= set(schedule.recompute.get(block, ()))
        for block, steps in other.recompute.items()
    )


@torch.no_grad()
def search_shared_schedule(
    pipe: Any,
    unet: nn.Module,
    profiles: Sequence[PromptProfile],
    config: BlockCachingConfig,
    *,
    height: int,
    width: int,
) -> tuple[CachingSchedule | None, list[dict[str, Any]]]:
    """The cheapest model-level schedule found that keeps ``config.min_ssim`` on every
    calibration prompt's worst profiling seed (module docstring).

    Returns:
        ``(schedule or None, one row per trial: ``prompt_index`` (the profile's index in
        ``profiles``) and the trial's figures)``;
        ``unet`` is left with the schedule attached (or none when no candidate passes).

    Raises:
        InvalidInputError: fewer than two profiles, or profiles that disagree on steps or
            blocks.
    """
    if len(profiles) < 2:
        raise InvalidInputError("a model-level schedule needs at least two prompts' profiles")
    times = mean_block_time_ms(list(profiles))
    candidates = model_level_candidates(list(profiles), config, block_time_ms=times)
    references = {p.prompt: reference_images(pipe, p, height, width) for p in profiles}
    rows: list[dict[str, Any]] = []
    kept: CachingSchedule | None = None

    def search(profile: PromptProfile, pool: Sequence[CachingSchedule]) -> CachingSchedule | None:
        found, trials = search_block_caching(
            pipe,
            unet,
            profile,
            config,
            height=height,
            width=width,
            reference=references[profile.prompt],
            candidates=pool,
        )
        index = float(list(profiles).index(profile))
        rows.extend({"prompt_index": index, **row} for row in trials)
        return found

    passed: set[int] = set()  # the prompts the kept schedule passed
    for _ in range(MAX_ROUNDS):
        for index, profile in enumerate(profiles):
            if index in passed:
                continue
            if kept is not None and search(profile, [kept]) is not None:
                passed.add(index)
                continue
            pool = [
                c
                for c in candidates
                if kept is None or (_covers(c, kept) and c.recompute != kept.recompute)
            ]
            found = search(profile, pool) if pool else None
            if found is None:
                remove_block_caching(unet)
                log.warning("no shared schedule keeps %s on %r", config.min_ssim, profile.prompt)
                return None, rows
            kept, passed = found, {index}
        if len(passed) == len(profiles):
            apply_block_caching(unet, kept)
            return kept, rows
    remove_block_caching(unet)
    return None, rows


@torch.no_grad()
def extract_model_level_fragment(
    pipe: Any,
    base: BaseModelInfo,
    profiles: Sequence[PromptProfile],
    config: ExtractionConfig,
    *,
    profile_id: str,
    key: str,
) -> tuple[Fragment, nn.Module]:
    """The model-level fragment of ``profiles`` (module docstring), keyed ``key``, and its
    edited denoiser copy (the schedule attached).

    ``profile_id`` is the first profile's (its manifest's profiling layer). The fragment's
    routing is disabled, with the reason, when no schedule keeps ``config.caching.min_ssim``
    on every prompt.

    Raises:
        InvalidInputError: no caching in ``config`` (a model-level fragment is a schedule).
    """
    if config.caching is None:
        raise InvalidInputError("a model-level fragment needs block caching (caching=True)")
    heads = HeadSelectionConfig(1.0, config.heads.min_heads_per_layer, config.heads.rank_margin)
    edits = replace(config, heads=heads, caching=None)
    fragment, unet = extract_fragment(pipe, base, profiles[0], edits, profile_id=profile_id)
    height = profiles[0].config.height or base.height
    width = profiles[0].config.width or base.width
    schedule, rows = search_shared_schedule(
        pipe, unet, profiles, config.caching, height=height, width=width
    )
    routing = routing_layer(schedule, rows, config.caching)
    fragment.manifest = fragment.manifest.model_copy(
        update={"key": key, "dynamic_routing": routing}
    )
    return fragment, unet
