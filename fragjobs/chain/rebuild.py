"""Rebuilding an evicted fragment on demand, from its stored profile.

The size cap (:mod:`fragjobs.chain.library_cap`) and ``fragjobs fragments rm`` delete a
fragment's objects and keep its row (status ``evicted``), its profile and lineage. When a
generation names one the cap evicted (its key, or the prompt's latest), :func:`rebuild_evicted`
extracts it again with the knobs recorded in its row, from its profile's stored statistics
(the profile step is not run again), validates it and leaves it ``ready``: same key, same row.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from fragjobs.catalog import FragmentEntity
from fragjobs.chain.extract_step import extract
from fragjobs.chain.maintenance import CAP_EVICTION
from fragjobs.chain.validate_step import validate
from fragjobs.chain.workspaces import Workspace
from fragjobs.errors import FragjobsError, FragmentError
from fragjobs.extraction import ExtractionConfig
from fragjobs.extraction.caching import BlockCachingConfig
from fragjobs.extraction.heads import HeadSelectionConfig
from fragjobs.extraction.int8 import Int8Config
from fragjobs.extraction.lowrank import LowRankConfig
from fragjobs.keys import canonical_json, normalise_prompt

log = logging.getLogger("fragjobs")

EVICTED = "evicted"

_TECHNIQUES = {
    "heads": HeadSelectionConfig,
    "low_rank": LowRankConfig,
    "int8": Int8Config,
    "caching": BlockCachingConfig,
}


def extraction_config_of(row: FragmentEntity) -> ExtractionConfig:
    """The extraction config recorded in ``row.params`` (what its key was made of).

    Raises:
        FragmentError: the params are not an extraction config this code can rebuild
            (a fragment recorded by ``fragjobs db rebuild``, or by another version).
    """
    params = row.params
    try:
        config = ExtractionConfig(
            **{
                name: None if params[name] is None else _technique(cls, params[name])
                for name, cls in _TECHNIQUES.items()
            }
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FragmentError(
            f"fragment {row.key} cannot be rebuilt: its params are not an extraction config "
            f"({exc}); run the chain on its prompt again"
        ) from exc
    again = {name: _asdict(getattr(config, name)) for name in _TECHNIQUES}
    recorded = {name: params[name] for name in _TECHNIQUES}
    if canonical_json(again) != canonical_json(recorded):
        raise FragmentError(
            f"fragment {row.key} cannot be rebuilt: its recorded knobs do not round-trip"
        )
    return config


def _technique(cls: type, values: dict[str, Any]) -> Any:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _asdict(config: Any) -> dict[str, Any] | None:
    """A technique's config as its key records it (``params()`` where the config has one:
    block caching leaves out the routing switches that are off)."""
    if config is None:
        return None
    return config.params() if hasattr(config, "params") else asdict(config)


def rebuild_evicted(ws: Workspace, key: str, *, model: str | None = None) -> FragmentEntity:
    """Extract evicted fragment ``key`` again from its stored profile, validate it.

    Returns:
        The fragment's row afterwards: ``ready`` if it passed its gate again, else
        ``failed_gate``. A fragment that is not ``evicted`` is returned unchanged.

    Raises:
        NotFoundError: no such fragment.
        FragmentError: its knobs cannot be read back, or the extraction made another key.
    """
    row = ws.catalog.get_fragment(key)
    if row.status != EVICTED:
        return row
    config = extraction_config_of(row)
    log.info("fragment %s was evicted: rebuilding it from profile %s", key, row.profile_id)
    result = extract(row.profile_id, config, ws=ws, model=model)
    if result.key != key:
        raise FragmentError(
            f"rebuilding fragment {key} made {result.key}: the base model or the code changed"
        )
    row = ws.catalog.get_fragment(key)
    if result.reused and row.status == "ready":  # another process rebuilt it meanwhile
        return row
    latest = ws.catalog.latest_validation(key)
    seeds = latest.metrics.get("seeds") if latest is not None else None
    if seeds:
        validate(key, seeds=seeds, ws=ws, progress=False)
    else:
        validate(key, ws=ws, progress=False)
    return ws.catalog.get_fragment(key)


def rebuilt_if_evicted(
    ws: Workspace, row: FragmentEntity | None, base_model_id: int, prompt: str
) -> FragmentEntity | None:
    """The fragment a generation should use, rebuilt first if it was evicted.

    ``row`` is what the lookup found (None: nothing ready). When it is None, the prompt's
    most recently used fragment evicted by the cap on this base is the one rebuilt. Only
    fragments the size cap evicted are rebuilt here; one removed by ``fragjobs fragments rm``
    stays removed. A rebuild that fails is logged and the evicted row is returned, so the
    generation falls back to the full model and says why.
    """
    if row is None:
        wanted = normalise_prompt(prompt)
        evicted = [
            f
            for f in ws.catalog.list_fragments(status=EVICTED, base_model_id=base_model_id)
            if _evicted_by_cap(f) and normalise_prompt(f.prompt) == wanted
        ]
        if not evicted:
            return None
        row = max(evicted, key=lambda f: (f.last_used_at or f.created_at, f.hit_count))
    if not _evicted_by_cap(row):
        return row
    try:
        return rebuild_evicted(ws, row.key)
    except FragjobsError as exc:
        log.warning("evicted fragment %s could not be rebuilt: %s", row.key, exc)
        return ws.catalog.get_fragment(row.key)


def _evicted_by_cap(row: FragmentEntity) -> bool:
    return row.status == EVICTED and (row.status_reason or "").startswith(CAP_EVICTION)
