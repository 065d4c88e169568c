"""The gate ladder: when a fragment fails its gate, extract a more conservative one.

The profiling seeds decide the edits, the gate judges them on other seeds, and four seeds
cannot see everything. A fragment that fails the gate is followed by the next rung of
:func:`conservative_config`, at most :data:`GATE_ATTEMPTS` fragments in all — first without
head pruning (on a trained model, pruning a few heads can flip one unseen seed's layout
while every profiling seed keeps its SSIM), then with a caching schedule held to half the
SSIM loss, a longer warm-up and at least the failed schedule's recomputes — each validated
on the same seeds against the same full-model images (made once). The embedded run and
the farm's validate task climb the same ladder.

A prompt the base's model-level fragment failed (:mod:`fragjobs.chain.model_level`) starts
higher (:func:`after_failed_model_level`): that fragment prunes no head and keeps its
schedule's fidelity on every calibration prompt, so failing it marks the prompt's seeds as
more sensitive than theirs, and the rungs less conservative than it are skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from fragjobs.chain.extract_step import ExtractResult, extract
from fragjobs.chain.knobs import DEFAULT_VALIDATION_SEEDS, head_guard
from fragjobs.chain.validate_step import ValidationResult, gate_figures, gate_reason, validate
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.extraction import ExtractionConfig, HeadSelectionConfig, caching_schedule
from fragjobs.manifest import FragmentManifest

log = logging.getLogger("fragjobs")

WARMUP_STEP = 0.1
"""What a caching rung adds to the warm-up (fraction of the steps that always compute): on
``a green triangle on the right over a black background`` every schedule with the first
rung's four warm-up steps kept at most 0.97 SSIM on one profiling seed, costly ones too,
so the second rung kept none (0.99x); with six it kept one the gate judged."""
MAX_WARMUP = 0.5
GATE_ATTEMPTS = 3
"""Fragments extracted at most for one run before it falls back to the full model."""


def extract_and_validate(
    profile_id: str,
    config: ExtractionConfig,
    *,
    seeds: list[int] | tuple[int, ...] = DEFAULT_VALIDATION_SEEDS,
    ws: Workspace | None = None,
    model: str | None = None,
    progress: bool = True,
    validated: ValidationResult | None = None,
) -> tuple[ExtractResult, ValidationResult, list[dict[str, Any]]]:
    """Extract and validate; when the gate fails, climb the ladder (module docstring).

    Every attempt stays in the catalog (the failed ones as ``failed_gate``). ``validated``:
    the validation of ``config``'s fragment on ``seeds`` when it was made already (the
    farm's validate task): its verdict and full-model images are used instead of
    validating it again.

    Returns:
        The last extraction and its validation, and one row per attempt
        (``key``, ``heads_kept``, ``heads_total``, ``caching_min_ssim``, ``passed``, ``ssim``
        (mean), ``ssim_worst``, ``colour_delta_e_worst``, ``clip_delta``, ``gate_reason``,
        ``extract_s``, ``validate_s``).
    """
    ws = ws or workspace()
    attempts: list[dict[str, Any]] = []
    reference = None
    while True:
        started = time.perf_counter()
        ext = extract(profile_id, config, ws=ws, model=model)
        extracted = time.perf_counter()
        if validated is not None and not attempts and validated.key == ext.key:
            val = validated
        else:
            val = validate(ext.key, seeds=seeds, ws=ws, progress=progress, reference=reference)
        pruning, routing = ext.manifest.pruning, ext.manifest.dynamic_routing
        attempts.append(
            {
                "key": ext.key,
                "heads_kept": pruning.heads_kept,
                "heads_total": pruning.heads_total,
                "caching_min_ssim": routing.min_ssim if routing.enabled else None,
                "passed": val.passed,
                **gate_figures(val.metrics),
                "gate_reason": None if val.passed else gate_reason(val.gate),
                "extract_s": round(extracted - started, 4),
                "validate_s": round(time.perf_counter() - extracted, 4),
            }
        )
        following = None if val.passed else conservative_config(config, ext.manifest)
        if following is None or len(attempts) >= GATE_ATTEMPTS:
            return ext, val, attempts
        log.warning("fragment %s failed the gate; extracting a more conservative one", ext.key)
        config, reference = following, val.full_images


def after_failed_model_level(config: ExtractionConfig) -> ExtractionConfig:
    """The first rung of a prompt the model-level fragment failed: ``config`` without head
    pruning, its caching schedule allowed half the SSIM loss (``head_guard``: 0.9 → 0.95)."""
    heads, caching = config.heads, config.caching
    config = replace(
        config, heads=HeadSelectionConfig(1.0, heads.min_heads_per_layer, heads.rank_margin)
    )
    if caching is None or caching.min_ssim >= 1.0:
        return config
    return replace(config, caching=replace(caching, min_ssim=head_guard(caching.min_ssim)))


def conservative_config(
    config: ExtractionConfig, manifest: FragmentManifest
) -> ExtractionConfig | None:
    """The next, more conservative config after ``manifest``'s fragment failed its gate.

    Heads were pruned: the same without head pruning. Else a caching schedule is in use:
    one that may lose half as much SSIM (``head_guard``: 0.9 → 0.95), warms up for
    :data:`WARMUP_STEP` more of the steps and recomputes every block at least where the
    failed one did (its ``floor``): searched freely, a stricter rung can fail every trial on
    a prompt whose fidelity is not monotone in the estimated cost and keep no schedule at
    all (a fragment no faster than the full model). Else None.
    """
    if manifest.pruning.heads_kept < manifest.pruning.heads_total:
        heads = config.heads
        return replace(
            config,
            heads=HeadSelectionConfig(1.0, heads.min_heads_per_layer, heads.rank_margin),
        )
    caching, failed = config.caching, caching_schedule(manifest)
    if failed is not None and caching is not None and caching.min_ssim < 1.0:
        return replace(
            config,
            caching=replace(
                caching,
                min_ssim=head_guard(caching.min_ssim),
                floor=tuple(failed.recompute.items()),
                warmup=round(min(caching.warmup + WARMUP_STEP, MAX_WARMUP), 6),
            ),
        )
    return None
