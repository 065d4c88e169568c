"""Local-folder backend: ``file:///abs/path`` (or a plain path) → files under that folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit
from urllib.request import url2pathname

from fragjobs.errors import ObjectNotFoundError, StorageError
from fragjobs.storage.base import ObjectStore, Readable, atomic_file, read_chunks


class LocalStore(ObjectStore):
    """An object store in a local (or mounted) folder; the folder is created on first write.

    Every write goes to a temporary file in the object's folder and is then renamed onto the
    object's path, so a crash never leaves a half-written object behind.

    Args:
        url: ``file:///abs/path``, or a plain path (``~`` is expanded, relative paths are
            resolved against the current folder).

    Raises:
        StorageError: if ``url`` is not a local file URL or path.
    """

    def __init__(self, url: str | Path) -> None:
        self.root = _root_from_url(str(url))
        self.url = self.root.as_uri()

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*name.split("/"))

    def _write_stream(self, name: str, stream: Readable) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder for object {name!r}: {exc}") from exc
        with atomic_file(path) as out:
            for chunk in read_chunks(name, stream):
                out.write(chunk)

    @contextlib.contextmanager
    def _open_read(self, name: str) -> Iterator[BinaryIO]:
        try:
            handle = self._path(name).open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFoundError(f"object {name!r} not found in {self.url}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open object {name!r} in {self.url}: {exc}") from exc
        with handle:
            yield handle

    def _exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def _delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"cannot delete object {name!r} in {self.url}: {exc}") from exc

    def _list(self, prefix: str) -> Iterator[str]:
        # Only walk the deepest folder the prefix names; the rest of the tree cannot match.
        folder = prefix.rpartition("/")[0]
        start = self._path(folder) if folder else self.root
        for dirpath, dirnames, filenames in os.walk(start, onerror=self._walk_error):
            # Temporary files and folders start with "."; no object name segment does.
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                if filename.startswith("."):
                    continue
                name = filename if relative == "." else f"{relative}/{filename}"
                if name.startswith(prefix):
                    yield name

    def _walk_error(self, exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError | NotADirectoryError):
            raise StorageError(f"cannot list {self.url}: {exc}") from exc


def _root_from_url(url: str) -> Path:
    if not url:
        raise StorageError("empty storage URL: give file:///absolute/path or a folder path")
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(
                f"file URL {url!r} names the host {parts.netloc!r}; "
                "use file:///absolute/path (three slashes) for a local folder"
            )
        path = Path(url2pathname(parts.path))
        if not path.is_absolute():
            raise StorageError(f"file URL {url!r} is not absolute: use file:///absolute/path")
    elif parts.scheme:
        raise StorageError(f"LocalStore needs a file:// URL or a path, got {url!r}")
    else:
        path = Path(url)
    return path.expanduser().resolve()
