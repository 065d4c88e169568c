"""Write one run's report folder from what the run measured.

The embedded run (:func:`fragjobs.chain.run`), ``fragjobs run --farm`` and the results page
all call :func:`write_run_report`, so every run's folder has the same files:
``metrics_summary.json`` (ours plus the seed's field names, and a ``report`` section saying
whether the run is VALID), ``fragment_manifest.json``, ``head_importance.json``,
``profiling_raw.parquet``, ``regression_diff.json`` (against the newest earlier VALID run of
the same base model and prompt, by the ``regression:`` rules of ``thresholds.yaml``),
``plots/latency.png``, ``plots/quality_tradeoff.png``, ``images/<seed>.png``, ``compare.png``
and ``index.html``. What a run could not produce is left out and named in ``notes``; a run
whose quality metrics are missing is INVALID. A failure while writing removes the folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fragjobs.errors import InvalidInputError
from fragjobs.reports.folders import (
    COMPARE_FILE,
    IMPORTANCE_FILE,
    INVALID,
    LATENCY_PLOT,
    MANIFEST_FILE,
    RAW_FILE,
    SUMMARY_FILE,
    TRADEOFF_PLOT,
    VALID,
    find_baseline,
    invalid_reasons,
    new_report_folder,
    read_report,
)
from fragjobs.reports.seed_names import add_seed_names

if TYPE_CHECKING:
    import torch

    from fragjobs.manifest import FragmentManifest
    from fragjobs.profiling import PromptProfile
    from fragjobs.validation.gate import Thresholds


@dataclass
class RunData:
    """What one run measured and made, for its report folder.

    Args:
        summary: ``metrics_summary.json`` as :func:`build_metrics_summary` made it, plus
            ``fragment`` (key, verified, used_for_generation, fallback_reason, attempts,
            stored_at) and ``knobs``.
        manifest: the fragment's manifest (None: not known).
        head_importance: the profile's ``head_importance.json`` document.
        profile: the profile with its raw statistics, and ``profile_id``.
        images: the variants' PNG bytes by seed.
        compare: ``(full images, fragment images, seeds)`` of the validation, for
            ``compare.png``; None: not available (``compare_reason`` says why).
        notes: lines for the reader (what was not measured, fallbacks).
    """

    summary: dict[str, Any]
    manifest: FragmentManifest | None
    head_importance: dict[str, Any] | None = None
    profile: PromptProfile | None = None
    profile_id: str | None = None
    images: dict[int, bytes] = field(default_factory=dict)
    compare: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None
    compare_reason: str | None = None
    notes: list[str] = field(default_factory=list)


def write_run_report(
    root: Path,
    data: RunData,
    thresholds: Thresholds,
    *,
    thresholds_source: str | None = None,
    now: datetime | None = None,
) -> Path:
    """Create ``root/YYYY-MM-DD_HHMM[-n]/`` (``now``: local time of the run's end) and write
    the run's report into it (module doc).

    Returns:
        The report folder.
    """
    folder = new_report_folder(Path(root), now)
    try:
        _write(folder, data, thresholds, thresholds_source)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _write(
    folder: Path, data: RunData, thresholds: Thresholds, thresholds_source: str | None
) -> None:
    from fragjobs.reports.html import render_run_page
    from fragjobs.reports.plots import latency_plot, quality_tradeoff_plot
    from fragjobs.reports.regression import evaluate_regression, write_diff

    notes = list(data.notes)
    if data.profile is None:
        notes.append(f"{RAW_FILE} not written: the profile's statistics were not available")
    if data.compare is None:
        notes.append(f"{COMPARE_FILE} not written: {data.compare_reason or 'no images'}")
    summary = add_seed_names(data.summary, run_id=folder.name, manifest=data.manifest, notes=notes)
    problems = invalid_reasons(summary)
    summary["report"] = {
        "run_id": folder.name,
        "status": INVALID if problems else VALID,
        "invalid_reasons": problems,
        "created_at": datetime.now(UTC).isoformat(),
        "compare_reason": None if data.compare is not None else data.compare_reason,
    }
    (folder / SUMMARY_FILE).write_text(
        json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    if data.manifest is not None:
        (folder / MANIFEST_FILE).write_bytes(data.manifest.to_bytes())
    if data.head_importance is not None:
        (folder / IMPORTANCE_FILE).write_text(
            json.dumps(data.head_importance, indent=2, sort_keys=True)
        )
    if data.profile is not None:
        from fragjobs.reports.profiling_raw import write_profiling_raw

        write_profiling_raw(data.profile, folder / RAW_FILE, profile_id=data.profile_id)
    if data.images:
        (folder / "images").mkdir()
        for seed, png in sorted(data.images.items()):
            (folder / "images" / f"{seed}.png").write_bytes(png)
    title = f"{summary.get('model')}: {summary.get('prompt')}"
    if data.compare is not None:
        from fragjobs.reports.compare import save_compare_image

        full, fragment, seeds = data.compare
        save_compare_image(full, fragment, seeds, folder / COMPARE_FILE, title=title)
    latency_plot(summary.get("performance") or {}, folder / LATENCY_PLOT, title=title)
    fragment = summary.get("fragment") or {}
    quality_tradeoff_plot(
        fragment.get("attempts") or [],
        folder / TRADEOFF_PLOT,
        chosen=fragment.get("key"),
        ssim_min=thresholds.ssim_min,
        clip_delta_max=thresholds.clip_delta_max,
        title=title,
    )
    current = read_report(folder)
    baseline, reason = find_baseline(folder.parent, current)
    try:
        diff = evaluate_regression(
            current,
            baseline if current.valid else None,
            thresholds,
            baseline_reason=reason if current.valid else "this run is INVALID",
            thresholds_source=thresholds_source,
        )
    except InvalidInputError as exc:
        diff = {
            "schema": "fragjobs.regression_diff/1",
            "run_id": folder.name,
            "status": "NOT_COMPARED",
            "passed": None,
            "baseline": None,
            "baseline_reason": str(exc),
            "regressions": [],
            "not_run": [],
            "checks": [],
        }
    write_diff(folder, diff)
    render_run_page(folder)
