"""Node-local warm cache: each object is fetched from its store once per node, then read locally.

The folder is its own index, so any number of worker processes on a node can share it:

- an entry is one file ``<digest>.obj``, where ``digest`` is the sha256 of
  ``[store url, object name, sha256]``; it appears only by atomic rename, complete and verified;
- its size is the file's size and its recency the file's mtime, bumped on every hit, so the
  least recently used entries are evicted first;
- concurrent misses of one object are serialised by a lock file (one of 256, chosen by the
  digest), so the second process finds the first one's copy instead of fetching again;
- an entry another process evicts while this one reads it is simply a miss.

Every hit re-hashes the cached bytes; a file that no longer matches (disk error, edited by
hand) is dropped and fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fragjobs.errors import InvalidInputError, StorageError
from fragjobs.keys import canonical_json, check_int, sha256_hex, validate_object_name
from fragjobs.storage.base import ObjectStore, atomic_file

if TYPE_CHECKING:
    from fragjobs.config import Settings

try:
    import fcntl
except ImportError:  # Windows: entries stay consistent, concurrent misses may fetch twice
    fcntl = None

log = logging.getLogger("fragjobs")

ENTRY_SUFFIX = ".obj"
"""File-name suffix of a cache entry."""

STALE_TEMP_SECONDS = 3600
"""A temporary file older than this was left by a killed process and is removed."""

_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_LOCKS_FOLDER = ".locks"


class WarmCache:
    """A bytes-bounded, least-recently-used cache of store objects in a local folder.

    Entries are keyed by (store URL, object name, sha256), so a replaced object never serves
    stale bytes. The counters ``hits``, ``misses`` and ``fetched_bytes`` count what this
    instance did (not other processes sharing the folder).

    Args:
        folder: the cache folder (created if missing); may be shared by processes of one node.
        max_bytes: the most bytes the cached files may occupy; an object larger than this is
            returned but not cached.

    Raises:
        InvalidInputError: ``max_bytes`` is not a positive integer.
        StorageError: the folder cannot be created.

    Example::

        cache = WarmCache.from_settings()
        data = cache.get_bytes(store, "fragments/tiny-sd/<key>/manifest.json", sha256)
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder).expanduser()
        self.max_bytes = check_int(max_bytes, "max_bytes", minimum=1)
        self.hits = 0
        self.misses = 0
        self.fetched_bytes = 0
        try:
            (self.folder / _LOCKS_FOLDER).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the warm cache folder {self.folder}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> WarmCache:
        """The cache at ``settings.resolved_cache_dir`` bounded by ``settings.cache_max_bytes``."""
        if settings is None:
            from fragjobs.config import get_settings

            settings = get_settings()
        return cls(settings.resolved_cache_dir, settings.cache_max_bytes)

    def get_bytes(self, store: ObjectStore, name: str, expected_sha256: str) -> bytes:
        """Return the bytes of ``name`` in ``store``, from the cache when it holds them.

        A cached copy is re-hashed and used only if it still matches ``expected_sha256``.
        Otherwise the object is fetched from ``store`` (checked against ``expected_sha256``),
        cached, and least recently used entries are evicted until the cache fits
        ``max_bytes``.

        Raises:
            InvalidKeyError: ``name`` is not a valid object name.
            InvalidInputError: ``expected_sha256`` is not 64 hex digits.
            ObjectNotFoundError: the object is not cached and not in ``store``.
            IntegrityError: the stored object does not match ``expected_sha256``.
            StorageError: the store or the cache folder failed.
        """
        validate_object_name(name)
        expected = _check_sha256(expected_sha256)
        path = self._path(store, name, expected)
        data = self._read_verified(path, expected)
        if data is None:
            with self._fetch_lock(path):
                # Another process may have cached it while this one waited for the lock.
                data = self._read_verified(path, expected)
                if data is None:
                    return self._fetch(store, name, expected, path)
        self.hits += 1
        return data

    def contains(self, store: ObjectStore, name: str, expected_sha256: str) -> bool:
        """Whether an entry for this object is cached (without reading or re-hashing it)."""
        validate_object_name(name)
        return self._path(store, name, _check_sha256(expected_sha256)).is_file()

    def discard(self, store: ObjectStore, name: str, expected_sha256: str) -> bool:
        """Drop the entry of this object if it is cached; return whether it was."""
        validate_object_name(name)
        path = self._path(store, name, _check_sha256(expected_sha256))
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def total_bytes(self) -> int:
        """The bytes the cached entries occupy now (all processes sharing the folder)."""
        return sum(size for _, _, size in self._entries())

    def __repr__(self) -> str:
        return f"WarmCache({str(self.folder)!r}, max_bytes={self.max_bytes})"

    def _path(self, store: ObjectStore, name: str, sha256: str) -> Path:
        digest = sha256_hex(canonical_json([store.url, name, sha256]))
        return self.folder / f"{digest}{ENTRY_SUFFIX}"

    def _read_verified(self, path: Path, expected: str) -> bytes | None:
        """The entry's bytes if it exists and matches ``expected`` (recency bumped), else None."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read the warm cache entry {path}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != expected:
            log.warning("warm cache entry %s is corrupt; dropping it and fetching again", path)
            path.unlink(missing_ok=True)
            return None
        _touch(path)
        return data

    def _fetch(self, store: ObjectStore, name: str, expected: str, path: Path) -> bytes:
        """Fetch from ``store`` (verified), cache the bytes at ``path``, evict; a miss."""
        self.misses += 1
        data = store.get_bytes(name, expected_sha256=expected)
        self.fetched_bytes += len(data)
        if len(data) <= self.max_bytes:  # else it would evict everything and still not fit
            with atomic_file(path) as out:
                out.write(data)
            _touch(path)
            self._evict()
        return data

    def _entries(self) -> Iterator[tuple[int, str, int]]:
        """``(mtime_ns, file name, size)`` of every entry; removes stale temporary files."""
        stale_before = time.time_ns() - STALE_TEMP_SECONDS * 10**9
        try:
            with os.scandir(self.folder) as scan:
                for entry in scan:
                    try:
                        info = entry.stat()
                    except FileNotFoundError:  # evicted by another process meanwhile
                        continue
                    if entry.name.endswith(ENTRY_SUFFIX) and not entry.name.startswith("."):
                        yield info.st_mtime_ns, entry.name, info.st_size
                    elif entry.name.endswith(".tmp") and info.st_mtime_ns < stale_before:
                        Path(entry.path).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot scan the warm cache folder {self.folder}: {exc}") from exc

    def _evict(self) -> None:
        """Delete least recently used entries until the cached files fit ``max_bytes``."""
        entries = sorted(self._entries())
        total = sum(size for _, _, size in entries)
        for _, file_name, size in entries:
            if total <= self.max_bytes:
                break
            try:
                (self.folder / file_name).unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot evict {file_name} from {self.folder}: {exc}") from exc
            total -= size

    def _fetch_lock(self, path: Path) -> contextlib.AbstractContextManager[None]:
        """Hold the lock of ``path``'s stripe; 256 stripes keep the lock files bounded."""
        return exclusive_file_lock(
            self.folder / _LOCKS_FOLDER / f"{path.name[:2]}.lock", "warm cache"
        )


@contextlib.contextmanager
def exclusive_file_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) across processes of a
    node; without ``fcntl`` (Windows) nothing is locked. ``what`` names the cache in errors."""
    if fcntl is None:
        yield
        return
    try:
        handle = lock_path.open("ab")
    except OSError as exc:
        raise StorageError(f"cannot open the {what} lock {lock_path}: {exc}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        except OSError as exc:
            raise StorageError(
                f"cannot lock {lock_path} ({exc}); keep the {what} on a local disk"
            ) from exc
        yield


def _touch(path: Path) -> None:
    # Recency is advisory: an entry evicted meanwhile, or not ours to touch, is still valid.
    # The clock is read here rather than left to the file system, whose timestamps are
    # coarser (a few ms) and would make entries touched in quick succession tie.
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


def _check_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA256_PATTERN.match(value.lower()):
        raise InvalidInputError(
            f"expected_sha256 must be 64 hex digits (the object's sha256), got {value!r}"
        )
    return value.lower()
