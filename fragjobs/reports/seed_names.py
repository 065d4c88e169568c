"""The seed project's field names in ``metrics_summary.json``, added beside ours.

Readers written for the seed look for ``run_id``, ``base_model_hash``, ``fragment_hash``,
``notes``, ``quality.clip_mean_full`` / ``clip_mean_fragment``, ``memory.peak_full_mb`` /
``peak_fragment_mb`` and, per hypothesis, ``H1.pruned_head_pct``, ``H1.clip_delta``,
``H2.vram_reduction_pct``, ``H2.lpips``, ``H3.reuse_pass_rate``, ``H4.batch_speedup``,
``H5.break_even_variants``. Each is derived from our own fields (never measured twice), so the
two names never disagree; a value we do not have is ``null``.
"""

from __future__ import annotations

import copy
from typing import Any

from fragjobs.keys import FRAGMENT_FILE
from fragjobs.manifest import FragmentManifest

_MIB = 2**20


def add_seed_names(
    summary: dict[str, Any],
    *,
    run_id: str,
    manifest: FragmentManifest | None,
    notes: list[str],
) -> dict[str, Any]:
    """A copy of ``summary`` (from :func:`build_metrics_summary`) with the seed's names added.

    Args:
        summary: the run's metrics summary.
        run_id: the report folder's name.
        manifest: the fragment's manifest (``None``: the fragment's fields are ``null``).
        notes: lines a reader should see (partial results, fallbacks, what was not measured).
    """
    out = copy.deepcopy(summary)
    hyp = {
        k: out.get("hypotheses", {}).get(k) or {"values": {}}
        for k in ("H1", "H2", "H3", "H4", "H5")
    }
    quality, memory = out.get("quality") or {}, out.get("memory") or {}
    artifact = manifest.artifacts.files.get(FRAGMENT_FILE) if manifest else None
    out["run_id"] = run_id
    out["base_model_hash"] = manifest.base_model.sha256 if manifest else None
    out["fragment_hash"] = artifact.sha256 if artifact else None
    out["notes"] = list(notes)
    quality["clip_mean_full"] = quality.get("clip_full")
    quality["clip_mean_fragment"] = quality.get("clip_fragment")
    memory["peak_full_mb"] = _mib(memory.get("peak_full_bytes"))
    memory["peak_fragment_mb"] = _mib(memory.get("peak_fragment_bytes"))
    pruning = manifest.pruning if manifest else None
    hyp["H1"]["values"]["pruned_head_pct"] = (
        round(100.0 * pruning.removed / pruning.heads_total, 4)
        if pruning and pruning.heads_total
        else None
    )
    hyp["H1"]["values"]["clip_delta"] = quality.get("clip_delta")
    peak = hyp["H2"]["values"].get("peak_reduction")
    hyp["H2"]["values"]["vram_reduction_pct"] = None if peak is None else round(100.0 * peak, 4)
    hyp["H2"]["values"]["lpips"] = quality.get("lpips")
    hyp["H3"]["values"]["reuse_pass_rate"] = hyp["H3"]["values"].get("pass_rate")
    hyp["H4"]["values"]["batch_speedup"] = hyp["H4"]["values"].get("speedup")
    hyp["H5"]["values"].setdefault("break_even_variants", None)
    if out.get("hypotheses"):
        out["hypotheses"] = {k: v for k, v in hyp.items() if k in out["hypotheses"]}
    return out


def _mib(value: Any) -> float | None:
    return None if value is None else round(value / _MIB, 1)
