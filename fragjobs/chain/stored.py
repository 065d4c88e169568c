"""Reading a fragment's stored objects, checked against the catalog (no torch needed)."""

from __future__ import annotations

from typing import Any

from fragjobs.catalog import FragmentEntity
from fragjobs.chain.locks import write_lock
from fragjobs.chain.workspaces import Workspace, warm_cache
from fragjobs.errors import (
    FragmentIntegrityError,
    IntegrityError,
    ManifestError,
    ObjectNotFoundError,
)
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object, sha256_hex
from fragjobs.manifest import FragmentManifest


def read_manifest(ws: Workspace, row: FragmentEntity) -> FragmentManifest:
    """The stored manifest of ``row``, checked against the catalog's sha256."""
    data = read_object(ws, object_of(row, MANIFEST_FILE), row.manifest_sha256)
    return FragmentManifest.from_bytes(data)


def update_manifest(ws: Workspace, key: str, changes: dict[str, Any]) -> FragmentManifest:
    """Change layers of fragment ``key``'s stored manifest; return the new manifest.

    Read, change and write happen under the fragment's write lock, so two processes that
    record, say, a validation and a measured performance both keep their change, and the
    catalog's sha256 is always the stored manifest's.
    """
    with write_lock(ws, f"fragment:{key}"):
        manifest = read_manifest(ws, ws.catalog.get_fragment(key)).model_copy(update=changes)
        data = manifest.to_bytes()
        ws.store.put_bytes(fragment_object(manifest.base_model.name, key, MANIFEST_FILE), data)
        ws.catalog.update_fragment(key, manifest_sha256=sha256_hex(data))
    return manifest


def read_object(ws: Workspace, name: str, sha256: str | None) -> bytes:
    """Object ``name``, checked against ``sha256``; through the warm cache when there is one."""
    cache = warm_cache(ws)
    if cache is None or sha256 is None:
        return ws.store.get_bytes(name, expected_sha256=sha256)
    return cache.get_bytes(ws.store, name, sha256)


def object_of(row: FragmentEntity, filename: str) -> str:
    """The store object name of ``filename`` in ``row``'s fragment folder."""
    base_name = row.key.split("_", 1)[0]
    return fragment_object(base_name, row.key, filename)


def verified_objects(ws: Workspace, row: FragmentEntity) -> tuple[FragmentManifest, bytes]:
    """The fragment's manifest and file bytes, both checked against the catalog's sha256.

    A mismatch or a missing object marks the fragment ``corrupt``, then raises.

    Raises:
        FragmentIntegrityError: stored bytes do not match their hashes, or are missing.
    """
    try:
        manifest = read_manifest(ws, row)
        return manifest, read_object(ws, object_of(row, FRAGMENT_FILE), row.file_sha256)
    except (IntegrityError, ManifestError, ObjectNotFoundError) as exc:
        ws.catalog.set_fragment_status(row.key, "corrupt", str(exc)[:500])
        if isinstance(exc, FragmentIntegrityError):
            raise
        raise FragmentIntegrityError(f"fragment {row.key} is corrupt: {exc}") from exc
