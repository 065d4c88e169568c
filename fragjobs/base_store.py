"""Base models in the shared store, found again by their sha256 on any node.

``fragjobs models add PATH`` uploads a diffusers folder once (:func:`add_base`) and registers
it in the catalog with the source ``store:<sha256>``; a worker that needs it fetches it into a
node-local, size-capped folder (:class:`fragjobs.base_cache.BaseCache`) and loads it from
there. The sha256 is the
one :mod:`fragjobs.base_models` gives the folder (its weight files and its name), so a base
is the same base wherever it is loaded from.

In the store::

    bases/<sha256>/files/<relative path>   every file of the folder, each with its sha256
    bases/<sha256>/index.json              {"format", "name", "sha256", "pipeline", "files"}

The index is written last: a base whose index is in the store was stored completely. Large
files go up in parts (the S3 backend's managed transfer), and a second ``add`` of the same
folder uploads nothing.

This module never imports torch: only :func:`add_base` hashes the weights (through
:func:`fragjobs.base_identity.folder_sha256`), and it checks its input first.
"""

from __future__ import annotations

import json
import logging
import os
import re
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
from fragjobs.families import family_of_class
from fragjobs.keys import validate_object_name

if TYPE_CHECKING:
    from fragjobs.catalog import BaseModelEntity, Catalog
    from fragjobs.config import Settings
    from fragjobs.storage import ObjectStore

log = logging.getLogger("fragjobs")

STORE_SOURCE_PREFIX = "store:"
"""Catalog source (and model name) of a base in the shared store: ``store:<sha256>``."""

INDEX_FILE = "index.json"
INDEX_FORMAT = "fragjobs-base-v1"
PIPELINE_INDEX_FILE = "model_index.json"
"""What makes a folder a diffusers pipeline."""

_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
    return STORE_SOURCE_PREFIX + check_sha256(sha256)


def stored_sha256(model: str) -> str | None:
    """The sha256 of ``store:<sha256>``; None for any other model name.

    Raises:
        InvalidInputError: ``store:`` followed by anything but a sha256.
    """
    if not isinstance(model, str) or not model.startswith(STORE_SOURCE_PREFIX):
        return None
    return check_sha256(model[len(STORE_SOURCE_PREFIX) :])


def base_object(sha256: str, path: str) -> str:
    """The object name of file ``path`` of stored base ``sha256``."""
    return f"bases/{check_sha256(sha256)}/files/{validate_object_name(path)}"


def index_object(sha256: str) -> str:
    """The object name of stored base ``sha256``'s index."""
    return f"bases/{check_sha256(sha256)}/{INDEX_FILE}"


def check_pipeline_folder(path: str | Path, name: str | None = None) -> tuple[Path, str, str]:
    """Check that ``path`` is a diffusers UNet pipeline folder, without loading anything.

    Returns:
        ``(absolute folder, base name, pipeline class)``; the name is ``name`` or the
        folder's own name.

    Raises:
        InvalidInputError: ``path`` is not a folder, or the name is not ``[A-Za-z0-9._-]``.
        UnknownModelError: no ``model_index.json``, a pipeline class fragjobs does not support
            (:mod:`fragjobs.families`), or its denoiser missing.
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
    family = family_of_class(pipeline if isinstance(pipeline, str) else None, str(folder))
    if family.denoiser not in document:
        raise UnknownModelError(
            f"{folder} is a {pipeline} without its {family.denoiser} (model_index.json)"
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
    from fragjobs.base_identity import folder_sha256

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


def required_index(store: ObjectStore, sha256: str) -> BaseIndex:
    """The index of stored base ``sha256``; ObjectNotFoundError saying what to do if absent."""
    try:
        return stored_index(store, sha256)
    except ObjectNotFoundError:
        raise ObjectNotFoundError(
            f"base {sha256[:12]}… is not in the store {store.url}: run fragjobs models add "
            "with its folder"
        ) from None


def check_stored(store: ObjectStore, sha256: str) -> BaseIndex:
    """The index of stored base ``sha256`` once every one of its objects is found in the store.

    Raises:
        ObjectNotFoundError: the index or one of the files is missing (the message says
            which and what to do).
    """
    index = required_index(store, sha256)
    missing = [f.path for f in index.files if not store.exists(base_object(sha256, f.path))]
    if missing:
        raise ObjectNotFoundError(
            f"base {index.name} ({sha256[:12]}…) is missing {len(missing)} object(s) in "
            f"{store.url}, first {missing[0]}: run fragjobs models add with its folder again"
        )
    return index


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


def check_sha256(value: Any) -> str:
    """``value`` if it is a base's sha256 (64 lower-case hex digits), else InvalidInputError."""
    if not isinstance(value, str) or not _SHA256_PATTERN.match(value):
        raise InvalidInputError(f"a base's sha256 is 64 lower-case hex digits, got {value!r}")
    return value
