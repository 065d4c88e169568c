"""A farm run's report data, read back from the catalog and the store.

The farm's workers profile, extract, validate and generate; what they measured is in the
catalog and the store: the fragment's manifest (its ``quality`` layer: metrics and gate), the
profile's statistics and the images. Timings and memory are not measured on the farm (the
batches ran on whichever workers were free), so H2, H4 and H5 say UNAVAILABLE with that
reason, and ``compare.png`` is not written (the validation images are not stored).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fragjobs.catalog import Catalog
from fragjobs.keys import (
    MANIFEST_FILE,
    PROFILE_IMPORTANCE_FILE,
    PROFILE_STATS_FILE,
    fragment_object,
    generation_object,
    profile_object,
)
from fragjobs.manifest import FragmentManifest
from fragjobs.reports.builder import RunData
from fragjobs.reports.summary import build_metrics_summary
from fragjobs.storage import ObjectStore
from fragjobs.validation.gate import GateResult, Thresholds

NOT_MEASURED_ON_FARM = "not measured on a farm run (batches ran on whichever workers were free)"


def farm_run_data(
    catalog: Catalog,
    store: ObjectStore,
    *,
    prompt: str,
    fragment_key: str | None,
    job_ids: list[str],
    fallback_reasons: list[str],
    errors: list[str],
    knobs: dict[str, Any],
    thresholds: Thresholds,
) -> RunData:
    """The :class:`RunData` of a finished farm job (see module).

    ``fragment_key``: the fragment used or built (None: none was; the run is INVALID).
    """
    import json

    from fragjobs.profiling import PromptProfile
    from fragjobs.validation.metrics import QualityMetrics

    notes = [f"batch given up: {e}" for e in errors]
    notes += [f"variants generated with the full model: {r}" for r in fallback_reasons]
    images = {
        image.seed: store.get_bytes(
            generation_object(job_id, f"{image.seed}.png"), expected_sha256=image.sha256
        )
        for job_id in job_ids
        for image in catalog.list_images(job_id)
    }
    manifest = None
    row = catalog.get_fragment(fragment_key) if fragment_key else None
    if row is not None:
        name = fragment_object(row.key.split("_", 1)[0], row.key, MANIFEST_FILE)
        data = store.get_bytes(name, expected_sha256=row.manifest_sha256)
        manifest = FragmentManifest.from_bytes(data)
    summary: dict[str, Any]
    if manifest is None or manifest.quality is None:
        summary = {
            "schema": "fragjobs.metrics_summary/1",
            "model": knobs.get("model"),
            "prompt": prompt.strip(),
            "device": "farm",
            "hypotheses": {},
        }
        notes.append("no validated fragment: quality metrics are missing")
    else:
        summary = build_metrics_summary(
            quality=QualityMetrics.model_validate(manifest.quality.metrics),
            gate=GateResult.model_validate(manifest.quality.gate),
            thresholds=thresholds,
            performance={},
            memory={"peak_reason": f"peak memory {NOT_MEASURED_ON_FARM}"},
            reuse={"pass_rate": manifest.reuse.pass_rate, "n": len(manifest.reuse.paraphrases)}
            if manifest.reuse.pass_rate is not None
            else None,
            model=manifest.base_model.name,
            prompt=prompt.strip(),
            device="farm",
        )
        for name in ("H4", "H5"):
            summary["hypotheses"][name]["reason"] = f"latencies {NOT_MEASURED_ON_FARM}"
    summary["fragment"] = {
        "key": fragment_key,
        "verified": manifest.verified if manifest else False,
        "used_for_generation": not fallback_reasons and fragment_key is not None,
        "fallback_reason": "; ".join(fallback_reasons) or None,
        "job_id": ",".join(job_ids),
        "attempts": [],
        "stored_at": row.storage_uri if row is not None else None,
    }
    summary["knobs"] = knobs
    profile, profile_id, importance = None, None, None
    if manifest is not None:
        profile_id = manifest.profiling.profile_id
        entity = catalog.get_profile(profile_id)
        stats = store.get_bytes(
            profile_object(profile_id, PROFILE_STATS_FILE), expected_sha256=entity.stats_sha256
        )
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / PROFILE_STATS_FILE
            path.write_bytes(stats)
            profile = PromptProfile.load(path)
        importance = json.loads(
            store.get_bytes(profile_object(profile_id, PROFILE_IMPORTANCE_FILE))
        )
    return RunData(
        summary=summary,
        manifest=manifest,
        head_importance=importance,
        profile=profile,
        profile_id=profile_id,
        images=images,
        compare=None,
        compare_reason="a farm run does not keep the validation's images",
        notes=notes,
    )
