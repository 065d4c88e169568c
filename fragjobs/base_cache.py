"""The node's base-model cache: stored bases fetched by sha256 into a size-capped folder.

On a node, ``<cache dir>/bases/<sha256>/<name>/`` is the pipeline folder (it keeps the base's
name, which is part of its sha256) and ``<cache dir>/bases/<sha256>/index.json`` its index,
written last, whose modification time is the entry's recency. Every file is checked against
its sha256 as it is fetched (:mod:`fragjobs.base_store` says how bases are stored); a later
load checks the whole folder's sha256 again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fragjobs.base_store import (
    INDEX_FILE,
    BaseIndex,
    base_object,
    check_sha256,
    required_index,
)
from fragjobs.errors import IntegrityError, InvalidInputError, StorageError
from fragjobs.keys import check_int
from fragjobs.storage.warm_cache import exclusive_file_lock

if TYPE_CHECKING:
    from fragjobs.config import Settings
    from fragjobs.storage import ObjectStore

log = logging.getLogger("fragjobs")

STALE_TEMP_SECONDS = 3600
"""A half-fetched folder older than this was left by a killed process and is removed."""

_LOCKS_FOLDER = ".locks"


class BaseCache:
    """Node-local copies of stored bases, least recently used evicted beyond ``max_bytes``.

    A copy is evicted only to make room for another; one evicted while another process of
    the node loads it makes that load fail, so the cap should hold the bases a node runs at
    once.

    Args:
        folder: where the copies live (created if missing); processes of a node may share it.
        max_bytes: the most bytes the copies may occupy together.

    Example::

        cache = BaseCache.from_settings(settings)
        pipeline_folder = cache.fetch(store, sha256)   # <folder>/<sha256>/<name>
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = check_int(max_bytes, "max_bytes", minimum=1)
        try:
            (self.folder / _LOCKS_FOLDER).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the base cache folder {self.folder}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> BaseCache:
        """``<FRAGJOBS_CACHE_DIR>/bases``, capped at ``FRAGJOBS_BASE_CACHE_MAX_BYTES``."""
        return cls(settings.resolved_cache_dir / "bases", settings.base_cache_max_bytes)

    def fetch(self, store: ObjectStore, sha256: str) -> Path:
        """The pipeline folder of base ``sha256``, fetched from ``store`` unless cached.

        Every fetched file is checked against its sha256 before the copy becomes visible;
        older copies are evicted first when the new one would not fit.

        Raises:
            ObjectNotFoundError: the base is not in the store.
            IntegrityError: a stored file does not match its sha256.
            StorageError: the base is larger than the cache, or the store or disk failed.
        """
        sha256 = check_sha256(sha256)
        folder = self._cached_folder(sha256)
        if folder is not None:
            return folder
        with self._lock(sha256):
            folder = self._cached_folder(sha256)  # fetched by another process meanwhile
            if folder is not None:
                return folder
            return self._fetch(store, sha256)

    def cached(self) -> list[BaseIndex]:
        """The indexes of the complete copies on this node, most recently used first."""
        return [index for _, _, index in sorted(self._entries(), key=lambda e: -e[0])]

    def contains(self, sha256: str) -> bool:
        """Whether a complete copy of base ``sha256`` is here (not re-checked)."""
        return (self.folder / check_sha256(sha256) / INDEX_FILE).is_file()

    def total_bytes(self) -> int:
        """Bytes of the complete copies here."""
        return sum(index.size for _, _, index in self._entries())

    def __repr__(self) -> str:
        return f"BaseCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def _cached_folder(self, sha256: str) -> Path | None:
        """The copy's pipeline folder when it is complete (recency bumped), else None."""
        entry = self.folder / sha256
        try:
            index = BaseIndex.from_json((entry / INDEX_FILE).read_bytes(), sha256)
        except FileNotFoundError:
            return None
        except (OSError, IntegrityError) as exc:
            log.warning("base cache entry %s is damaged (%s): fetching it again", entry, exc)
            _remove(entry)
            return None
        pipeline = entry / index.name
        for file in index.files:
            path = pipeline / file.path
            if not path.is_file() or path.stat().st_size != file.size:
                log.warning("base cache entry %s lost %s: fetching it again", entry, file.path)
                _remove(entry)
                return None
        _touch(entry / INDEX_FILE)
        return pipeline

    def _fetch(self, store: ObjectStore, sha256: str) -> Path:
        index = required_index(store, sha256)
        if index.size > self.max_bytes:
            raise StorageError(
                f"base {index.name} is {index.size} bytes, more than this node's cache holds "
                f"({self.max_bytes}): raise FRAGJOBS_BASE_CACHE_MAX_BYTES"
            )
        self._evict(room_for=index.size)
        temporary = self.folder / f".{sha256}.{os.getpid()}.tmp"
        _remove(temporary)
        try:
            for file in index.files:
                store.get_file(
                    base_object(sha256, file.path),
                    temporary / index.name / file.path,
                    expected_sha256=file.sha256,
                )
            (temporary / INDEX_FILE).write_bytes(index.to_json())
            _remove(self.folder / sha256)  # an incomplete copy (no index) of an earlier try
            os.replace(temporary, self.folder / sha256)
        except OSError as exc:
            raise StorageError(
                f"cannot write base {sha256[:12]}… into {self.folder}: {exc}"
            ) from exc
        finally:
            _remove(temporary)
        log.info("fetched base %s (%s, %d bytes) into %s", index.name, sha256, index.size, self)
        return self.folder / sha256 / index.name

    def _entries(self) -> Iterator[tuple[int, str, BaseIndex]]:
        """``(recency, sha256, index)`` of every complete copy; removes stale half-fetches."""
        stale_before = time.time_ns() - STALE_TEMP_SECONDS * 10**9
        try:
            children = list(os.scandir(self.folder))
        except OSError as exc:
            raise StorageError(f"cannot scan the base cache {self.folder}: {exc}") from exc
        for child in children:
            if child.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if child.stat().st_mtime_ns < stale_before:
                        _remove(Path(child.path))
                continue
            try:
                check_sha256(child.name)
            except InvalidInputError:
                continue
            try:
                path = Path(child.path) / INDEX_FILE
                index = BaseIndex.from_json(path.read_bytes(), child.name)
                recency = path.stat().st_mtime_ns
            except (OSError, IntegrityError):  # being fetched, evicted, or damaged
                continue
            yield recency, child.name, index

    def _evict(self, room_for: int) -> None:
        """Remove least recently used copies until ``room_for`` more bytes fit."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(index.size for _, _, index in entries)
        for _, sha256, index in entries:
            if total + room_for <= self.max_bytes:
                break
            log.info("evicting base %s (%s) from %s", index.name, sha256, self)
            _remove(self.folder / sha256)
            total -= index.size

    def _lock(self, sha256: str) -> contextlib.AbstractContextManager[None]:
        return exclusive_file_lock(self.folder / _LOCKS_FOLDER / f"{sha256}.lock", "base cache")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _touch(path: Path) -> None:
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))
