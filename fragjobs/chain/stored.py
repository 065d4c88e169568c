"""Reading a fragment's stored objects, checked against the catalog (no torch needed)."""

from __future__ import annotations

from typing import Any

from fragjobs.catalog import FragmentEntity
from fragjobs.chain.locks import write_lock
from fragjobs.chain.workspaces import Workspace, warm_cache
from fragjobs.errors import (
    FragmentError,
    FragmentIntegrityError,
    IntegrityError,
    ManifestError,
    ObjectNotFoundError,
)
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object, sha256_hex
from fragjobs.manifest import FragmentManifest
from fragjobs.storage import LocalStore, ObjectStore

NODE_LOCAL_FOLDER = "local-fragments"
"""Folder of the node's warm cache dir holding fragments placed ``local`` (never evicted)."""


def read_manifest(ws: Workspace, row: FragmentEntity) -> FragmentManifest:
    """The stored manifest of ``row``, checked against the catalog's sha256."""
    data = read_object(ws, object_of(row, MANIFEST_FILE), row.manifest_sha256, store_of(ws, row))
    return FragmentManifest.from_bytes(data)


def update_manifest(ws: Workspace, key: str, changes: dict[str, Any]) -> FragmentManifest:
    """Change layers of fragment ``key``'s stored manifest; return the new manifest.

    Read, change and write happen under the fragment's write lock, so two processes that
    record, say, a validation and a measured performance both keep their change, and the
    catalog's sha256 is always the stored manifest's.
    """
    with write_lock(ws, f"fragment:{key}"):
        row = ws.catalog.get_fragment(key)
        manifest = read_manifest(ws, row).model_copy(update=changes)
        data = manifest.to_bytes()
        name = fragment_object(manifest.base_model.name, key, MANIFEST_FILE)
        store_of(ws, row).put_bytes(name, data)
        ws.catalog.update_fragment(key, manifest_sha256=sha256_hex(data))
    return manifest


def read_object(
    ws: Workspace, name: str, sha256: str | None, store: ObjectStore | None = None
) -> bytes:
    """Object ``name`` of ``store`` (default: the shared store), checked against ``sha256``;
    the shared store is read through the warm cache when there is one."""
    if store is not None and store is not ws.store:
        return store.get_bytes(name, expected_sha256=sha256)
    cache = warm_cache(ws)
    if cache is None or sha256 is None:
        return ws.store.get_bytes(name, expected_sha256=sha256)
    return cache.get_bytes(ws.store, name, sha256)


def node_store(ws: Workspace) -> LocalStore:
    """This node's store of fragments placed ``local`` (in its warm cache folder)."""
    return LocalStore(ws.settings.resolved_cache_dir / NODE_LOCAL_FOLDER)


def store_of(ws: Workspace, row: FragmentEntity) -> ObjectStore:
    """Where ``row``'s objects are: the shared store, or this node's for a local fragment."""
    return node_store(ws) if row.placement == "local" else ws.store


def object_of(row: FragmentEntity, filename: str) -> str:
    """The store object name of ``filename`` in ``row``'s fragment folder."""
    base_name = row.key.split("_", 1)[0]
    return fragment_object(base_name, row.key, filename)


def verified_objects(ws: Workspace, row: FragmentEntity) -> tuple[FragmentManifest, bytes]:
    """The fragment's manifest and file bytes, both checked against the catalog's sha256.

    A mismatch or a missing object marks the fragment ``corrupt``, then raises; an
    ``evicted`` fragment has no objects and a ``local`` one missing here is on another
    node: neither is corrupt.

    Raises:
        FragmentIntegrityError: stored bytes do not match their hashes, or are missing.
        FragmentError: an evicted fragment, or a ``local`` one not on this node.
    """
    try:
        manifest = read_manifest(ws, row)
        data = read_object(ws, object_of(row, FRAGMENT_FILE), row.file_sha256, store_of(ws, row))
        return manifest, data
    except ObjectNotFoundError as exc:
        if row.status == "evicted":  # its objects were deleted on purpose
            raise FragmentError(
                f"fragment {row.key} is evicted ({row.status_reason}): it has no stored objects"
            ) from exc
        if row.placement == "local":  # kept by the node that built it, maybe not this one
            raise FragmentError(
                f"fragment {row.key} is kept node-local and is not on this node: {exc}"
            ) from exc
        ws.catalog.set_fragment_status(row.key, "corrupt", str(exc)[:500])
        raise FragmentIntegrityError(f"fragment {row.key} is corrupt: {exc}") from exc
    except (IntegrityError, ManifestError) as exc:
        ws.catalog.set_fragment_status(row.key, "corrupt", str(exc)[:500])
        if isinstance(exc, FragmentIntegrityError):
            raise
        raise FragmentIntegrityError(f"fragment {row.key} is corrupt: {exc}") from exc
