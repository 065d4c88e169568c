"""The object store interface shared by every backend.

An :class:`ObjectStore` holds content-hashed objects under relative names such as
``fragments/tiny-sd/<key>/manifest.json`` (DESIGN §3). The public methods here validate every
name, hash every byte that goes in or out and check integrity; a backend only implements the
small ``_``-prefixed primitives, so every backend behaves the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from fragjobs.errors import IntegrityError, InvalidKeyError, StorageError
from fragjobs.keys import validate_object_name

CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    """One object in a store: its name, full URI, sha256 (hex) and size in bytes."""

    name: str
    uri: str
    sha256: str
    size: int


class Readable(Protocol):
    """Anything with ``read(size) -> bytes``: an open binary file, a :class:`HashingReader`."""

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes (all remaining when negative); ``b""`` at the end."""
        ...


class HashingReader:
    """A read-only stream wrapper that hashes and counts the bytes read through it."""

    def __init__(self, stream: Readable) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        """Read up to ``size`` bytes from the wrapped stream, hashing them."""
        data = self._stream.read(size)
        self._hash.update(data)
        self.size += len(data)
        return data

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything read so far."""
        return self._hash.hexdigest()


def _validate_prefix(prefix: str) -> str:
    """A prefix is a name, or the start of one, optionally ending with ``/``."""
    if prefix:
        validate_object_name(prefix.removesuffix("/"))
    return prefix


def _check_integrity(name: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise IntegrityError(
            f"object {name!r} is corrupt: expected sha256 {expected}, got {actual}; "
            "delete it and store it again"
        )


class ObjectStore(ABC):
    """Abstract object store; open one with :func:`fragjobs.storage.open_store`.

    Names are relative paths of ``[A-Za-z0-9._-]`` segments separated by ``/``; anything else
    raises :class:`~fragjobs.errors.InvalidKeyError` before the store is touched. A missing
    object raises :class:`~fragjobs.errors.ObjectNotFoundError`, bytes that do not match an
    expected sha256 raise :class:`~fragjobs.errors.IntegrityError`, and any other I/O failure
    raises :class:`~fragjobs.errors.StorageError`.

    Example::

        store = open_store("file:///srv/fragjobs")
        obj = store.put_bytes("profiles/p1/head_importance.json", b"{}")
        data = store.get_bytes(obj.name, expected_sha256=obj.sha256)
    """

    url: str
    """The canonical URL of the store's root (``file:///srv/fragjobs``, ``s3://bucket/p``)."""

    # -- primitives a backend implements (names are already validated) --------------------

    @abstractmethod
    def _write_stream(self, name: str, stream: Readable) -> None:
        """Store everything ``stream.read()`` returns as ``name``, atomically."""

    @abstractmethod
    def _open_read(self, name: str) -> contextlib.AbstractContextManager[Readable]:
        """Open ``name`` for reading; raise ObjectNotFoundError if it does not exist."""

    @abstractmethod
    def _exists(self, name: str) -> bool:
        """Whether the object ``name`` exists."""

    @abstractmethod
    def _delete(self, name: str) -> None:
        """Delete ``name``; a missing object is not an error."""

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[str]:
        """Names of all objects starting with ``prefix``, in any order."""

    # -- public API ------------------------------------------------------------------------

    def uri(self, name: str) -> str:
        """The full URI of ``name`` in this store (the object need not exist)."""
        return f"{self.url.rstrip('/')}/{validate_object_name(name)}"

    def put_bytes(self, name: str, data: bytes) -> StoredObject:
        """Store ``data`` as ``name`` (replacing any previous object) and describe it."""
        validate_object_name(name)
        reader = HashingReader(io.BytesIO(data))
        self._write_stream(name, reader)
        return StoredObject(name, self.uri(name), reader.sha256, reader.size)

    def put_file(self, name: str, path: Path) -> StoredObject:
        """Store the file at ``path`` as ``name``, streaming it and hashing it on the way."""
        validate_object_name(name)
        try:
            with Path(path).open("rb") as source:
                reader = HashingReader(source)
                self._write_stream(name, reader)
        except OSError as exc:
            raise StorageError(f"cannot read {path} to store it as {name!r}: {exc}") from exc
        return StoredObject(name, self.uri(name), reader.sha256, reader.size)

    def get_bytes(self, name: str, expected_sha256: str | None = None) -> bytes:
        """Return the bytes of ``name``, checked against ``expected_sha256`` when given."""
        validate_object_name(name)
        with self._open_read(name) as stream:
            data = b"".join(read_chunks(name, stream))
        _check_integrity(name, expected_sha256, hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, name: str, dest: Path, expected_sha256: str | None = None) -> Path:
        """Copy ``name`` to ``dest`` (parent folders are created) and return ``dest``.

        The copy is written next to ``dest`` and moved into place only once its sha256 has
        been checked, so ``dest`` never holds bytes that failed the check.
        """
        validate_object_name(name)
        dest = Path(dest)
        with self._open_read(name) as stream:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {dest.parent} to fetch {name!r}: {exc}") from exc
            reader = HashingReader(stream)
            with atomic_file(dest) as out:
                for chunk in read_chunks(name, reader):
                    out.write(chunk)
                _check_integrity(name, expected_sha256, reader.sha256)
        return dest

    def exists(self, name: str) -> bool:
        """Whether an object called ``name`` exists."""
        return self._exists(validate_object_name(name))

    def stat(self, name: str) -> StoredObject:
        """Describe ``name``; its sha256 is computed by streaming the stored bytes."""
        validate_object_name(name)
        with self._open_read(name) as stream:
            reader = HashingReader(stream)
            for _ in read_chunks(name, reader):
                pass
        return StoredObject(name, self.uri(name), reader.sha256, reader.size)

    def delete(self, name: str) -> None:
        """Delete ``name``; deleting a missing object is not an error."""
        self._delete(validate_object_name(name))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose name starts with ``prefix``; return how many.

        An empty prefix is refused: it would empty the whole store.
        """
        if not prefix:
            raise InvalidKeyError("delete_prefix needs a non-empty prefix, such as 'profiles/p1/'")
        names = self.list(prefix)
        for name in names:
            self._delete(name)
        return len(names)

    def list(self, prefix: str = "") -> list[str]:
        """Sorted names of the objects whose name starts with ``prefix``."""
        return sorted(self._list(_validate_prefix(prefix)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def read_chunks(name: str, stream: Readable) -> Iterator[bytes]:
    """Yield ``stream``'s bytes in chunks; an I/O error becomes a StorageError naming ``name``."""
    try:
        while chunk := stream.read(CHUNK_SIZE):
            yield chunk
    except OSError as exc:
        raise StorageError(f"I/O error while transferring object {name!r}: {exc}") from exc


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """Yield a temporary file next to ``dest``; move it onto ``dest`` only on success.

    The temporary name starts with ``.``, which no valid object name does, so a listing never
    mistakes a leftover for an object. On any error the temporary file is removed.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise StorageError(f"cannot create a temporary file in {dest.parent}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {dest}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
