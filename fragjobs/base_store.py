"""Base models in the shared store, found again by their sha256 on any node.

``fragjobs models add PATH`` uploads a diffusers folder once (:func:`add_base`) and registers
it in the catalog with the source ``store:<sha256>``; a worker that needs it fetches it into a
node-local, size-capped folder (:class:`BaseCache`) and loads it from there. The sha256 is the
one :mod:`fragjobs.base_models` gives the folder (its weight files and its name), so a base
is the same base wherever it is loaded from.

In the store::

    bases/<sha256>/files/<relative path>   every file of the folder, each with its sha256
    bases/<sha256>/index.json              {"format", "name", "sha256", "pipeline", "files"}

The index is written last: a base whose index is in the store was stored completely. Large
files go up in parts (the S3 backend's managed transfer), and a second ``add`` of the same
folder uploads nothing.

On a node, ``<cache dir>/bases/<sha256>/<name>/`` is the pipeline folder (it keeps the base's
name, which is part of its sha256) and ``<cache dir>/bases/<sha256>/index.json`` its index,
written last, whose modification time is the entry's recency. Every file is checked against
its sha256 as it is fetched; a later load checks the whole folder's sha256 again.

This module never imports torch: only :func:`add_base` hashes the weights (through
:func:`fragjobs.base_models.folder_sha256`), and it checks its input first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fragjobs.errors import (
    IntegrityError,
    InvalidInputError,
    ObjectNotFoundError,
    StorageError,
    UnknownModelError,
)
from fragjobs.keys import check_int, validate_object_name

if TYPE_CHECKING:
    from fragjobs.catalog import BaseModelEntity, Catalog
    from fragjobs.config import Settings
    from fragjobs.storage import ObjectStore

try:
    import fcntl
except ImportError:  # Windows: entries stay consistent, concurrent misses may fetch twice
    fcntl = None

log = logging.getLogger("fragjobs")

STORE_SOURCE_PREFIX = "store:"
"""Catalog source (and model name) of a base in the shared store: ``store:<sha256>``."""

INDEX_FILE = "index.json"
INDEX_FORMAT = "fragjobs-base-v1"
PIPELINE_INDEX_FILE = "model_index.json"
"""What makes a folder a diffusers pipeline."""

STALE_TEMP_SECONDS = 3600
"""A half-fetched folder older than this was left by a killed process and is removed."""

_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LOCKS_FOLDER = ".locks"


@dataclass(frozen=True)
class BaseFile:
    """One file of a stored base: its path in the folder, sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BaseIndex:
    """What a stored base is: its name, sha256, pipeline class and files."""

    name: str
    sha256: str
    pipeline: str
    files: tuple[BaseFile, ...]

    @property
    def size(self) -> int:
        """Bytes of all its files."""
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        """The index as stored (``bases/<sha256>/index.json``)."""
        document = {
            "format": INDEX_FORMAT,
            "name": self.name,
            "sha256": self.sha256,
            "pipeline": self.pipeline,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
        }
        return json.dumps(document, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, sha256: str) -> BaseIndex:
        """Read an index, which must describe the base ``sha256``.

        Raises:
            IntegrityError: unreadable, of another format, or of another base.
        """
        try:
            document = json.loads(data)
            index = cls(
                document["name"],
                document["sha256"],
                document["pipeline"],
                tuple(BaseFile(f["path"], f["sha256"], int(f["size"])) for f in document["files"]),
            )
            for file in index.files:
                validate_object_name(file.path)
        except (ValueError, KeyError, TypeError, InvalidInputError) as exc:
            raise IntegrityError(f"the index of base {sha256} is damaged ({exc})") from exc
        if document.get("format") != INDEX_FORMAT or index.sha256 != sha256:
            raise IntegrityError(
                f"the index of base {sha256} describes {index.sha256} ({document.get('format')})"
            )
        return index


@dataclass(frozen=True)
class AddedBase:
    """What :func:`add_base` did: the base's index, its catalog row, what was uploaded."""

    index: BaseIndex
    base_model: BaseModelEntity
    uploaded_files: int
    uploaded_bytes: int


def open_settings_store(settings: Settings) -> ObjectStore:
    """The store ``settings`` name (``FRAGJOBS_STORAGE_URL``), an S3 one with their endpoint,
    region and credentials rather than the environment's."""
    from urllib.parse import urlsplit

    from fragjobs.storage import open_store

    url = settings.resolved_storage_url
    s3 = urlsplit(url).scheme.lower() == "s3"
    return open_store(url, **({"settings": settings} if s3 else {}))


def store_source(sha256: str) -> str:
    """``store:<sha256>``: the catalog source, and the model name, of a stored base."""
    return STORE_SOURCE_PREFIX + _check_sha256(sha256)


def stored_sha256(model: str) -> str | None:
    """The sha256 of ``store:<sha256>``; None for any other model name.

    Raises:
        InvalidInputError: ``store:`` followed by anything but a sha256.
    """
    if not isinstance(model, str) or not model.startswith(STORE_SOURCE_PREFIX):
        return None
    return _check_sha256(model[len(STORE_SOURCE_PREFIX) :])


def base_object(sha256: str, path: str) -> str:
    """The object name of file ``path`` of stored base ``sha256``."""
    return f"bases/{_check_sha256(sha256)}/files/{validate_object_name(path)}"


def index_object(sha256: str) -> str:
    """The object name of stored base ``sha256``'s index."""
    return f"bases/{_check_sha256(sha256)}/{INDEX_FILE}"


def check_pipeline_folder(path: str | Path, name: str | None = None) -> tuple[Path, str, str]:
    """Check that ``path`` is a diffusers UNet pipeline folder, without loading anything.

    Returns:
        ``(absolute folder, base name, pipeline class)``; the name is ``name`` or the
        folder's own name.

    Raises:
        InvalidInputError: ``path`` is not a folder, or the name is not ``[A-Za-z0-9._-]``.
        UnknownModelError: no ``model_index.json``, or not a UNet text-to-image pipeline.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InvalidInputError(f"{path} is not a folder: give a diffusers pipeline folder")
    folder = folder.resolve()
    name = folder.name if name is None else name
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise InvalidInputError(
            f"base model name {name!r} must be 1-100 of [A-Za-z0-9._-], starting with a letter "
            "or digit: give one with --name"
        )
    index_path = folder / PIPELINE_INDEX_FILE
    try:
        document = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise UnknownModelError(
            f"{folder} is not a diffusers pipeline folder (no {PIPELINE_INDEX_FILE})"
        ) from None
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"{index_path} is unreadable: {exc}") from exc
    pipeline = document.get("_class_name") if isinstance(document, dict) else None
    if not isinstance(pipeline, str) or "unet" not in document:
        raise UnknownModelError(
            f"{folder} is not a UNet text-to-image pipeline ({pipeline or 'no _class_name'} "
            "in model_index.json): fragjobs runs SD 1.x/2.x/XL pipelines"
        )
    return folder, name, pipeline


def add_base(
    path: str | Path,
    *,
    store: ObjectStore,
    catalog: Catalog,
    settings: Settings,
    name: str | None = None,
) -> AddedBase:
    """Upload the diffusers folder ``path`` to ``store`` once and register it in ``catalog``.

    Idempotent: a base whose index is already in the store is not uploaded again (only
    files missing from the store are). Its catalog row gets the source ``store:<sha256>``.

    Raises:
        InvalidInputError, UnknownModelError: not a usable pipeline folder (see
            :func:`check_pipeline_folder`); nothing was uploaded or registered.
        StorageError: the store failed, or the folder changed while it was being added.
    """
    folder, name, pipeline = check_pipeline_folder(path, name)
    files = _folder_files(folder)
    before = _stats(folder, files)
    from fragjobs.base_models import folder_sha256

    sha256 = folder_sha256(folder, name, settings)
    uploaded_files = uploaded_bytes = 0
    try:
        index: BaseIndex | None = stored_index(store, sha256)
    except ObjectNotFoundError:
        index = None
    fresh = index is None
    if index is None:
        stored = []
        for relative in files:
            obj = store.put_file(base_object(sha256, relative), folder / relative)
            stored.append(BaseFile(relative, obj.sha256, obj.size))
            uploaded_files, uploaded_bytes = uploaded_files + 1, uploaded_bytes + obj.size
        index = BaseIndex(name, sha256, pipeline, tuple(stored))
    else:
        for file in index.files:  # a store that lost objects since: put them back
            if not store.exists(base_object(sha256, file.path)):
                obj = store.put_file(base_object(sha256, file.path), folder / file.path)
                if obj.sha256 != file.sha256:
                    raise StorageError(
                        f"{folder / file.path} differs from the stored base {sha256[:12]}…: "
                        "it changed after the base was added"
                    )
                uploaded_files, uploaded_bytes = uploaded_files + 1, uploaded_bytes + obj.size
    if _stats(folder, files) != before:
        raise StorageError(f"{folder} changed while it was being added: add it again")
    if fresh:  # last: an index in the store means every file is there
        store.put_bytes(index_object(sha256), index.to_json())
    row = register_stored_base(catalog, name, sha256)
    return AddedBase(index, row, uploaded_files, uploaded_bytes)


def register_stored_base(catalog: Catalog, name: str, sha256: str) -> BaseModelEntity:
    """The catalog row of base ``sha256``, created or moved to the source ``store:<sha256>``."""
    source = store_source(sha256)
    row = catalog.get_or_create_base_model(name, sha256, source)
    if row.source != source:
        row = catalog.set_base_model_source(sha256, source)
    return row


def stored_index(store: ObjectStore, sha256: str) -> BaseIndex:
    """The index of stored base ``sha256``.

    Raises:
        ObjectNotFoundError: the base is not in the store.
        IntegrityError: its index is damaged.
    """
    return BaseIndex.from_json(store.get_bytes(index_object(sha256)), sha256)


def check_stored(store: ObjectStore, sha256: str) -> BaseIndex:
    """The index of stored base ``sha256`` once every one of its objects is found in the store.

    Raises:
        ObjectNotFoundError: the index or one of the files is missing (the message says
            which and what to do).
    """
    try:
        index = stored_index(store, sha256)
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"base {sha256[:12]}… is not in the store {store.url}: run fragjobs models add "
            "with its folder"
        ) from None
    missing = [f.path for f in index.files if not store.exists(base_object(sha256, f.path))]
    if missing:
        raise ObjectNotFoundError(
            f"base {index.name} ({sha256[:12]}…) is missing {len(missing)} object(s) in "
            f"{store.url}, first {missing[0]}: run fragjobs models add with its folder again"
        )
    return index


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
        sha256 = _check_sha256(sha256)
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
        return (self.folder / _check_sha256(sha256) / INDEX_FILE).is_file()

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
        try:
            index = stored_index(store, sha256)
        except ObjectNotFoundError:
            raise ObjectNotFoundError(
                f"base {sha256[:12]}… is not in the store {store.url}: run fragjobs models add "
                "with its folder"
            ) from None
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
            if not _SHA256_PATTERN.match(child.name):
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

    @contextlib.contextmanager
    def _lock(self, sha256: str) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        lock_path = self.folder / _LOCKS_FOLDER / f"{sha256}.lock"
        try:
            handle = lock_path.open("ab")
        except OSError as exc:
            raise StorageError(f"cannot open the base cache lock {lock_path}: {exc}") from exc
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            except OSError as exc:
                raise StorageError(
                    f"cannot lock {lock_path} ({exc}); keep the cache on a local disk"
                ) from exc
            yield


def describe_bases(
    catalog: Catalog, store: ObjectStore, holders: dict[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """Every base in the catalog: name, sha256, source, size and nodes holding it.

    ``size`` is the stored size (None for a base not in the store); ``nodes`` the hostnames
    in ``holders[sha256]`` (None when nobody could be asked).
    """
    out = []
    for row in catalog.list_base_models():
        size = None
        if stored_sha256(row.source) is not None:
            try:
                size = stored_index(store, row.sha256).size
            except (ObjectNotFoundError, IntegrityError):
                size = None
        out.append(
            {
                "name": row.name,
                "sha256": row.sha256,
                "source": row.source,
                "size": size,
                "nodes": None if holders is None else sorted(holders.get(row.sha256, [])),
            }
        )
    return out


def _folder_files(folder: Path) -> list[str]:
    """Relative paths of the folder's files; hidden files and folders (``.cache``) are left."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative = Path(dirpath).relative_to(folder)
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = (relative / filename).as_posix()
            try:
                validate_object_name(path)
            except InvalidInputError:
                raise InvalidInputError(
                    f"{folder / path}: file names of a stored base must be [A-Za-z0-9._-]"
                ) from None
            files.append(path)
    return files


def _stats(folder: Path, files: list[str]) -> list[tuple[int, int]]:
    try:
        return [((folder / f).stat().st_size, (folder / f).stat().st_mtime_ns) for f in files]
    except OSError as exc:
        raise StorageError(
            f"{folder} changed while it was being added ({exc}): add it again"
        ) from exc


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _touch(path: Path) -> None:
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


def _check_sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_PATTERN.match(value):
        raise InvalidInputError(f"a base's sha256 is 64 lower-case hex digits, got {value!r}")
    return value
