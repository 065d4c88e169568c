"""Re-validation of stored fragments: re-hash their objects, re-run their gate (DESIGN §5).

``fragjobs revalidate`` runs :func:`revalidate` in-process; the farm runs the task
``fragjobs.revalidate`` on a celery beat schedule (``FRAGJOBS_REVALIDATE_INTERVAL_S``). For
every fragment that is ``ready``, ``corrupt`` (a repaired one becomes usable again) or stuck
``building`` (stored completely but never validated):

1. every stored object (``manifest.json``, ``fragment.safetensors``) is read back from the
   store — never from a node's warm cache, never from a sha256 the store recorded as metadata
   — and hashed. A missing object, or bytes whose sha256 is not the catalog's, marks the
   fragment ``corrupt``; the reason names the object.
2. the quality gate is re-run (:func:`fragjobs.chain.validate`) on the fragment's stored
   validation seeds (its manifest's ``quality.seeds``) with the current thresholds: a new
   validation row and the status ``ready`` or ``failed_gate``.

Two runs never overlap (:func:`revalidation_lock`): on PostgreSQL a session-level advisory
lock held on a connection of its own for the whole run (the server releases it if the process
dies); on SQLite an exclusive ``flock`` on ``<catalog file>.revalidate.lock`` (one machine, as
SQLite itself). A run that finds the lock taken does nothing and says so
(:attr:`RevalidationReport.skipped`).

Example::

    report = revalidate()
    [c.key for c in report.checks if c.status == "corrupt"]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from fragjobs.catalog import FragmentEntity
from fragjobs.chain.knobs import DEFAULT_VALIDATION_SEEDS
from fragjobs.chain.locks import revalidation_lock
from fragjobs.chain.validate_step import validate
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import (
    CatalogError,
    FragjobsError,
    FragmentError,
    IntegrityError,
    ManifestError,
    ObjectNotFoundError,
)
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object, validate_key
from fragjobs.manifest import FragmentManifest
from fragjobs.storage import ObjectStore

log = logging.getLogger("fragjobs")

CHECKED_STATUSES = ("ready", "corrupt", "failed_gate", "building")
"""Statuses a fragment named explicitly (``keys``) may have to be checked."""

DEFAULT_STATUSES = ("ready", "corrupt", "building")
"""Statuses checked by default: ready ones, corrupt ones (restored when their objects are whole
again) and ``building`` ones that were stored completely but never validated (stuck)."""

STUCK_AFTER_S = 3600.0


@dataclass(frozen=True)
class FragmentCheck:
    """What re-validation found for one fragment.

    ``status`` is the status afterwards; ``objects_ok`` whether every stored object matched
    its hash; ``gate_passed`` the re-run gate's verdict (None when it was not run: corrupt
    objects, ``gate=False``, or the base model is not available here); ``reason`` why the
    fragment is not ready, or why the gate was not run.
    """

    key: str
    status: str
    objects_ok: bool
    gate_passed: bool | None
    validation_id: int | None
    reason: str | None


@dataclass
class RevalidationReport:
    """A re-validation run: one check per fragment, or ``skipped`` (why nothing was done)."""

    checks: list[FragmentCheck] = field(default_factory=list)
    skipped: str | None = None
    elapsed_s: float = 0.0

    @property
    def marked(self) -> list[FragmentCheck]:
        """The checks whose fragment is not ready afterwards (corrupt or failed_gate)."""
        return [c for c in self.checks if c.status != "ready"]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON values."""
        return {
            "checks": [asdict(c) for c in self.checks],
            "skipped": self.skipped,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def revalidate(
    ws: Workspace | None = None,
    *,
    keys: Sequence[str] | None = None,
    gate: bool = True,
    progress_callback: Callable[[int, int, str], None] | None = None,
) -> RevalidationReport:
    """Re-hash the stored objects of every ready fragment and re-run its quality gate.

    Args:
        ws: the workspace (default: the process-wide one of the environment).
        keys: check only these fragments (status ready, corrupt or failed_gate: a corrupt
            fragment whose objects were restored becomes ready again if it passes).
        gate: also re-run the quality gate (False: hashes only).
        progress_callback: called as ``(done, total, key)`` after each fragment.

    Returns:
        the report; ``skipped`` is set when another run holds the lock.

    Raises:
        CatalogError: the catalog is unreachable.
        InvalidKeyError: a malformed key in ``keys``.
    """
    ws = ws or workspace()
    wanted = [validate_key(k) for k in keys] if keys is not None else None
    started = time.perf_counter()
    with revalidation_lock(ws) as acquired:
        if not acquired:
            return RevalidationReport(
                skipped="another re-validation of this catalog is running (it holds the lock)"
            )
        if wanted is None:
            rows = [
                row
                for status in DEFAULT_STATUSES
                for row in ws.catalog.list_fragments(status=status)
                if status != "building" or _stuck(row)
            ]
        else:
            rows = [ws.catalog.get_fragment(k) for k in wanted]
        report = RevalidationReport()
        for done, row in enumerate(rows, start=1):
            report.checks.append(_check_fragment(ws, row, gate=gate))
            if progress_callback is not None:
                progress_callback(done, len(rows), row.key)
    report.elapsed_s = time.perf_counter() - started
    return report


def _check_fragment(ws: Workspace, row: FragmentEntity, *, gate: bool) -> FragmentCheck:
    if row.status not in CHECKED_STATUSES:
        return FragmentCheck(
            row.key, row.status, False, None, None, f"not checked: status is {row.status}"
        )
    try:
        manifest_bytes = _verified_bytes(ws.store, row, MANIFEST_FILE, row.manifest_sha256)
        _verified_hash(ws.store, row, FRAGMENT_FILE, row.file_sha256)
        manifest = FragmentManifest.from_bytes(manifest_bytes)
    except (IntegrityError, ObjectNotFoundError, ManifestError) as exc:
        reason = f"re-validation: {exc}"[:500]
        log.warning("fragment %s is corrupt: %s", row.key, exc)
        ws.catalog.set_fragment_status(row.key, "corrupt", reason)
        return FragmentCheck(row.key, "corrupt", False, None, None, reason)
    if not gate:
        if row.status == "corrupt":  # whole again, but not validated: not usable yet
            reason = "objects whole again; run the gate to make it ready"
            ws.catalog.set_fragment_status(row.key, "building", reason)
            return FragmentCheck(row.key, "building", True, None, None, reason)
        return FragmentCheck(row.key, row.status, True, None, None, row.status_reason)
    seeds = _stored_seeds(ws, row, manifest)
    try:
        result = validate(row.key, seeds=seeds, ws=ws, progress=False)
    except CatalogError:
        raise
    except FragjobsError as exc:
        after = ws.catalog.get_fragment(row.key)
        if isinstance(exc, FragmentError) and after.status == "corrupt":
            return FragmentCheck(row.key, "corrupt", False, None, None, after.status_reason)
        # e.g. the base model is not available on this machine: leave the status alone.
        reason = f"gate not re-run: {exc}"[:500]
        log.warning("fragment %s: %s", row.key, reason)
        return FragmentCheck(row.key, after.status, True, None, None, reason)
    after = ws.catalog.get_fragment(row.key)
    latest = ws.catalog.latest_validation(row.key)
    return FragmentCheck(
        row.key,
        after.status,
        True,
        result.passed,
        latest.id if latest is not None else None,
        after.status_reason,
    )


def _stuck(row: FragmentEntity) -> bool:
    """Stored completely but still ``building`` after :data:`STUCK_AFTER_S` (never validated)."""
    age = (datetime.now(UTC) - row.created_at).total_seconds()
    return row.manifest_sha256 is not None and age > STUCK_AFTER_S


def _object_name(row: FragmentEntity, filename: str) -> str:
    return fragment_object(row.key.split("_", 1)[0], row.key, filename)


def _verified_bytes(
    store: ObjectStore, row: FragmentEntity, filename: str, expected: str | None
) -> bytes:
    """The stored bytes of one of the fragment's objects, checked against the catalog."""
    if expected is None:
        raise IntegrityError(f"fragment {row.key} has no recorded sha256 for {filename}")
    return store.get_bytes(_object_name(row, filename), expected_sha256=expected)


def _verified_hash(
    store: ObjectStore, row: FragmentEntity, filename: str, expected: str | None
) -> None:
    """Stream one object and compare its sha256 with the catalog's, without keeping it."""
    if expected is None:
        raise IntegrityError(f"fragment {row.key} has no recorded sha256 for {filename}")
    name = _object_name(row, filename)
    # ObjectStore.stat hashes the stored bytes; a backend's override may answer from
    # metadata recorded at upload (S3), which cannot reveal bytes changed afterwards.
    actual = ObjectStore.stat(store, name).sha256
    if actual != expected:
        raise IntegrityError(
            f"object {name!r} is corrupt: expected sha256 {expected}, got {actual}"
        )


def _stored_seeds(ws: Workspace, row: FragmentEntity, manifest: Any) -> list[int]:
    """The seeds the fragment was validated on: its manifest's, else its last validation's."""
    if manifest.quality is not None and manifest.quality.seeds:
        return list(manifest.quality.seeds)
    latest = ws.catalog.latest_validation(row.key)
    if latest is not None and latest.metrics.get("seeds"):
        return list(latest.metrics["seeds"])
    return list(DEFAULT_VALIDATION_SEEDS)
