"""What only LocalStore does (file:// URLs, atomic rename), and the URL-scheme registry.

The contract every store keeps, run on this backend too, is in test_store_contract.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fragjobs.errors import InvalidInputError, StorageError, UnknownStorageSchemeError
from fragjobs.storage import LocalStore, ObjectStore, open_store, register_store, registry
from fragjobs.storage import base as storage_base

NAME = "fragments/tiny-sd/tiny-sd_0123456789abcdef_01234567/manifest.json"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> ObjectStore:
    return open_store(root.as_uri())


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def test_store_url_forms_and_lazy_root(root: Path) -> None:
    from_path = open_store(str(root))
    from_url = open_store(root.as_uri())

    assert isinstance(from_path, LocalStore)
    assert from_path.url == from_url.url == root.as_uri()
    assert from_url.uri("a/b.json") == f"{root.as_uri()}/a/b.json"
    assert from_url.list() == []
    assert not root.exists()  # created on first write only
    from_url.put_bytes("a/b.json", b"{}")
    assert from_path.get_bytes("a/b.json") == b"{}"


def test_file_url_with_a_host_is_refused() -> None:
    with pytest.raises(StorageError, match="three slashes"):
        LocalStore("file://server/share")


def test_crash_before_the_rename_keeps_the_old_object_and_no_temp_file(
    store: ObjectStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_bytes(NAME, b"version 2")

    def crash(*_args: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(storage_base.os, "replace", crash)
    with pytest.raises(StorageError, match="simulated crash"):
        store.put_bytes(NAME, b"version 3, never visible")

    assert store.get_bytes(NAME) == b"version 2"
    assert files_under(root) == [NAME]


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))


@pytest.mark.usefixtures("clean_registry")
def test_unknown_scheme_lists_registered_schemes() -> None:
    register_store("memtest", lambda url, **kwargs: None)
    with pytest.raises(UnknownStorageSchemeError) as excinfo:
        open_store("gopher://host/path")
    message = str(excinfo.value)
    assert "'gopher'" in message and "file" in message and "memtest" in message


@pytest.mark.usefixtures("clean_registry")
def test_register_callable_and_lazy_dotted_path(root: Path) -> None:
    register_store("Mirror", lambda url, **kwargs: LocalStore(kwargs["root"]))
    store = open_store("mirror://anything", root=root)
    assert isinstance(store, LocalStore) and store.url == root.as_uri()

    # A dotted path is only imported when its scheme is opened.
    register_store("broken", "fragjobs.storage.no_such_backend.Store")
    with pytest.raises(StorageError, match="no_such_backend"):
        open_store("broken://bucket/prefix")

    register_store("alias", "fragjobs.storage.local.LocalStore")
    with pytest.raises(StorageError, match="file://"):
        open_store("alias://x")  # imported and called: LocalStore refuses the scheme


@pytest.mark.usefixtures("clean_registry")
@pytest.mark.parametrize(("scheme", "factory"), [("", "a.b"), ("9x", "a.b"), ("ok", "nodots")])
def test_register_store_validates_its_arguments(scheme: str, factory: str) -> None:
    with pytest.raises(InvalidInputError):
        register_store(scheme, factory)
