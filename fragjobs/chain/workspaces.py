"""Where the chain reads and writes: settings, catalog, store, and the node's warm cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fragjobs.catalog import Catalog
from fragjobs.chain.state import STATE
from fragjobs.config import Settings, get_settings
from fragjobs.errors import ConfigError
from fragjobs.storage import LocalStore, ObjectStore, WarmCache, open_store


@dataclass
class Workspace:
    """Where the chain reads and writes: settings, catalog and object store."""

    settings: Settings
    catalog: Catalog
    store: ObjectStore

    @classmethod
    def open(
        cls, settings: Settings | None = None, *, allow_missing_catalog: bool = False
    ) -> Workspace:
        """The workspace of the settings; the embedded SQLite catalog is migrated on open.

        Raises:
            ConfigError: the embedded catalog file is gone while the store still holds
                fragments (a new, empty catalog would hide them): ``fragjobs db rebuild``.
        """
        settings = settings or get_settings()
        store = open_store(settings.resolved_storage_url)
        url = settings.resolved_database_url
        if not allow_missing_catalog and url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") :])
            if not path.exists() and store.list("fragments/"):
                raise ConfigError(
                    f"the catalog {path} is missing but the store {store.url} holds "
                    "fragments: run `fragjobs db rebuild` to rebuild it from their manifests"
                )
        return cls(settings, Catalog.open_embedded(settings), store)

    def close(self) -> None:
        self.catalog.dispose()


def workspace(settings: Settings | None = None) -> Workspace:
    """The process-wide workspace for these settings (opened once)."""
    settings = settings or get_settings()
    key = (settings.resolved_database_url, settings.resolved_storage_url)
    if key not in STATE.workspaces:
        STATE.workspaces[key] = Workspace.open(settings)
    return STATE.workspaces[key]


def warm_cache(ws: Workspace) -> WarmCache | None:
    """The node-local warm cache in front of ``ws``'s store; None for a local folder.

    A local folder is read at disk speed already; any other store (S3) is read through the
    cache in ``FRAGJOBS_CACHE_DIR`` (bounded by ``FRAGJOBS_CACHE_MAX_BYTES``), shared by the
    processes of a node. One instance per folder and process, so its counters add up.
    """
    if isinstance(ws.store, LocalStore):
        return None
    key = (str(ws.settings.resolved_cache_dir), ws.settings.cache_max_bytes)
    if key not in STATE.warm_caches:
        STATE.warm_caches[key] = WarmCache.from_settings(ws.settings)
    return STATE.warm_caches[key]
