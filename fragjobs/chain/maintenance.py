"""Repairing the library: remove a fragment, collect garbage, rebuild the catalog.

* :func:`remove_fragment` (``fragjobs fragments rm KEY``): the fragment's objects, its
  entries in this node's warm cache and its warm UNets go; its catalog row stays as a
  tombstone (status ``evicted``, hashes cleared) so lineage (profile, validations, jobs)
  survives, and ``extract`` or a generation that names it builds it again from its stored
  profile (:mod:`fragjobs.chain.rebuild`). :func:`evict_fragment` does the same for the
  library's size cap (:mod:`fragjobs.chain.library_cap`).
* :func:`collect_garbage` (``fragjobs fragments gc``): fragments left ``building`` by a run
  that died (older than ``stale_s``) and store folders of fragments the catalog does not know.
* :func:`rebuild_catalog` (``fragjobs db rebuild``): a catalog lost while the store still
  holds fragments is rebuilt from the stored manifests and profiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fragjobs.catalog import FragmentEntity
from fragjobs.chain.locks import write_lock
from fragjobs.chain.state import STATE
from fragjobs.chain.stored import object_of, store_of
from fragjobs.chain.workspaces import Workspace, warm_cache
from fragjobs.errors import FragjobsError
from fragjobs.keys import (
    FRAGMENT_FILE,
    MANIFEST_FILE,
    PROFILE_IMPORTANCE_FILE,
    PROFILE_STATS_FILE,
    profile_object,
    prompt_hash,
    sha256_hex,
    validate_key,
)
from fragjobs.manifest import FragmentManifest

log = logging.getLogger("fragjobs")

CAP_EVICTION = "evicted by the library cap"
"""How the status reason of a fragment evicted by the size cap begins: only those are rebuilt
on demand by a generation; one removed by ``fragjobs fragments rm`` stays removed until
``extract`` is asked for it."""

STALE_BUILDING_S = 3600.0
"""A fragment ``building`` for longer than this (without a stored manifest) was abandoned."""


def remove_fragment(ws: Workspace, key: str) -> None:
    """Remove fragment ``key``'s objects and warm copies; keep its row as a tombstone.

    Raises:
        NotFoundError: no such fragment.
    """
    evict_fragment(ws, key, "removed by fragjobs fragments rm")


def evict_fragment(
    ws: Workspace,
    key: str,
    reason: str,
    *,
    only_if: Callable[[FragmentEntity], bool] | None = None,
) -> FragmentEntity | None:
    """Delete fragment ``key``'s objects (shared store or node-local), its warm cache entries
    and warm UNets; set status ``evicted`` with ``reason``. The row, its profile,
    validations and jobs stay, so it can be rebuilt from its stored profile.

    ``only_if`` is checked on the row read under the fragment's write lock (a fragment
    pinned or rebuilt meanwhile is left alone). Returns the row as it was before, or None
    when ``only_if`` said no.

    Raises:
        NotFoundError: no such fragment.
    """
    validate_key(key)
    with write_lock(ws, f"fragment:{key}"):
        row = ws.catalog.get_fragment(key)
        if only_if is not None and not only_if(row):
            return None
        cache = warm_cache(ws)
        if cache is not None and row.placement == "shared":
            for filename, sha in (
                (FRAGMENT_FILE, row.file_sha256),
                (MANIFEST_FILE, row.manifest_sha256),
            ):
                if sha is not None:
                    cache.discard(ws.store, object_of(row, filename), sha)
        store_of(ws, row).delete_prefix(object_of(row, "")[:-1] + "/")
        ws.catalog.update_fragment(key, size_bytes=None, file_sha256=None, manifest_sha256=None)
        ws.catalog.set_fragment_status(key, "evicted", reason)
    for cached in [k for k in STATE.fragment_unets if k[0] == key]:
        del STATE.fragment_unets[cached]
    return row


@dataclass
class GarbageReport:
    """What :func:`collect_garbage` removed."""

    stale_fragments: list[str] = field(default_factory=list)
    orphan_folders: list[str] = field(default_factory=list)


def collect_garbage(ws: Workspace, *, stale_s: float = STALE_BUILDING_S) -> GarbageReport:
    """Remove abandoned ``building`` fragments and store folders no catalog row names."""
    report = GarbageReport()
    cutoff = datetime.now(UTC) - timedelta(seconds=stale_s)
    for row in ws.catalog.list_fragments(status="building"):
        if row.manifest_sha256 is None and row.created_at < cutoff:
            with write_lock(ws, f"fragment:{row.key}"):
                ws.store.delete_prefix(object_of(row, "")[:-1] + "/")
                ws.catalog.delete_fragment(row.key)
            report.stale_fragments.append(row.key)
    known = {row.key for row in ws.catalog.list_fragments()}
    folders = {"/".join(name.split("/")[:3]) for name in ws.store.list("fragments/")}
    for folder in sorted(folders):
        key = folder.rsplit("/", 1)[-1]
        if key not in known:
            ws.store.delete_prefix(folder + "/")
            report.orphan_folders.append(folder)
    return report


@dataclass
class RebuildReport:
    """What :func:`rebuild_catalog` recorded, and what it could not read."""

    profiles: list[str] = field(default_factory=list)
    fragments: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def rebuild_catalog(ws: Workspace) -> RebuildReport:
    """Record every fragment whose manifest is in the store (and its base and profile).

    Each manifest is checked against the artifact hashes it lists; a fragment whose file is
    missing or damaged is skipped with the reason. A fragment whose manifest says it passed
    its gate is ``ready`` (with its validation), else ``failed_gate``.
    """
    report = RebuildReport()
    for name in sorted(n for n in ws.store.list("fragments/") if n.endswith("/" + MANIFEST_FILE)):
        try:
            _rebuild_one(ws, name, report)
        except (FragjobsError, ValueError) as exc:
            report.skipped[name] = str(exc)[:300]
            log.warning("not rebuilt from %s: %s", name, exc)
    return report


def _rebuild_one(ws: Workspace, manifest_name: str, report: RebuildReport) -> None:
    manifest_bytes = ws.store.get_bytes(manifest_name)
    manifest = FragmentManifest.from_bytes(manifest_bytes)
    folder = manifest_name.rsplit("/", 1)[0]
    artifact = manifest.artifacts.files.get(FRAGMENT_FILE)
    file_bytes = ws.store.get_bytes(
        f"{folder}/{FRAGMENT_FILE}", expected_sha256=artifact.sha256 if artifact else None
    )
    info, prof = manifest.base_model, manifest.profiling
    base_row = ws.catalog.get_or_create_base_model(info.name, info.sha256, info.source)
    stats_name = profile_object(prof.profile_id, PROFILE_STATS_FILE)
    stats = ws.store.stat(stats_name)
    params = {
        "profile": {
            "seeds": prof.seeds,
            "steps": prof.steps,
            "step_stride": prof.step_stride,
            "guidance_scale": prof.guidance_scale,
            "height": prof.height,
            "width": prof.width,
        }
    }
    if ws.catalog.find_profile(prof.profile_id) is None:
        ws.catalog.get_or_create_profile(
            prof.profile_id,
            base_row.id,
            prof.prompt,
            prompt_hash(prof.prompt),
            params,
            ws.store.uri(stats_name),
            stats.sha256,
            ws.store.uri(profile_object(prof.profile_id, PROFILE_IMPORTANCE_FILE)),
        )
        report.profiles.append(prof.profile_id)
    row, created = ws.catalog.create_fragment(
        manifest.key,
        prof.profile_id,
        base_row.id,
        prof.prompt,
        {"rebuilt_from": manifest_name},
        ws.store.uri(folder),
    )
    ws.catalog.update_fragment(
        manifest.key,
        size_bytes=len(file_bytes),
        file_sha256=sha256_hex(file_bytes),
        manifest_sha256=sha256_hex(manifest_bytes),
    )
    if created and manifest.quality is not None:
        ws.catalog.add_validation(
            manifest.key, manifest.quality.model_dump(mode="json"), bool(manifest.verified)
        )
    status = "ready" if manifest.verified else "failed_gate"
    ws.catalog.set_fragment_status(manifest.key, status, "rebuilt from the stored manifest")
    report.fragments.append(row.key)
