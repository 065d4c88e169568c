"""Tests of fragjobs.storage: the ObjectStore contract on LocalStore, and the URL registry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fragjobs.errors import (
    IntegrityError,
    InvalidInputError,
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    UnknownStorageSchemeError,
)
from fragjobs.storage import (
    LocalStore,
    ObjectStore,
    StoredObject,
    open_store,
    register_store,
    registry,
)
from fragjobs.storage import base as storage_base

NAME = "fragments/tiny-sd/tiny-sd_0123456789abcdef_01234567/manifest.json"
BAD_NAMES = ["../escape", "a/../b", "/abs/path", "has space", "a//b", "", "./a", "a\\b"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> ObjectStore:
    return open_store(root.as_uri())


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def test_put_get_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    data = b"\x00\x01 fragment bytes" * 1000
    stored = store.put_bytes(NAME, data)

    assert stored == StoredObject(
        NAME, store.uri(NAME), hashlib.sha256(data).hexdigest(), len(data)
    )
    assert store.get_bytes(NAME, expected_sha256=stored.sha256) == data
    assert store.exists(NAME)
    assert store.stat(NAME) == stored

    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * storage_base.CHUNK_SIZE + 17))
    from_file = store.put_file("profiles/p1/stats.safetensors", source)
    assert from_file.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert from_file.size == source.stat().st_size
    dest = store.get_file(from_file.name, tmp_path / "out" / "copy.bin", from_file.sha256)
    assert dest.read_bytes() == source.read_bytes()


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


def test_list_delete_and_delete_prefix(store: ObjectStore) -> None:
    for name in ["profiles/p2/x.json", "profiles/p1/b.json", "profiles/p1/a.json", "top.json"]:
        store.put_bytes(name, name.encode())

    assert store.list() == [
        "profiles/p1/a.json",
        "profiles/p1/b.json",
        "profiles/p2/x.json",
        "top.json",
    ]
    assert store.list("profiles/p1/") == ["profiles/p1/a.json", "profiles/p1/b.json"]
    assert store.list("profiles/p") == store.list("profiles/")
    assert store.list("nothing/here/") == []
    assert not store.exists("profiles/p1")  # a folder is not an object

    store.delete("top.json")
    store.delete("top.json")  # missing is fine
    assert not store.exists("top.json")

    assert store.delete_prefix("profiles/p1/") == 2
    assert store.list() == ["profiles/p2/x.json"]
    with pytest.raises(InvalidKeyError, match="non-empty prefix"):
        store.delete_prefix("")


def test_put_replaces_atomically_and_leaves_no_temp_file(
    store: ObjectStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_bytes(NAME, b"version 1")
    store.put_bytes(NAME, b"version 2")
    assert files_under(root) == [NAME]

    def crash(*_args: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(storage_base.os, "replace", crash)
    with pytest.raises(StorageError, match="simulated crash"):
        store.put_bytes(NAME, b"version 3, never visible")

    assert store.get_bytes(NAME) == b"version 2"
    assert files_under(root) == [NAME]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_rejected_before_writing(
    store: ObjectStore, root: Path, tmp_path: Path, name: str
) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"x")
    for call in (
        lambda: store.put_bytes(name, b"x"),
        lambda: store.put_file(name, source),
        lambda: store.get_bytes(name),
        lambda: store.get_file(name, tmp_path / "dest"),
        lambda: store.exists(name),
        lambda: store.stat(name),
        lambda: store.delete(name),
        lambda: store.uri(name),
    ):
        with pytest.raises(InvalidKeyError):
            call()
    assert not root.exists()
    assert not (tmp_path / "dest").exists()


def test_list_refuses_an_escaping_prefix(store: ObjectStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.list("../")


def test_sha_mismatch_raises_and_leaves_nothing_at_dest(
    store: ObjectStore, root: Path, tmp_path: Path
) -> None:
    stored = store.put_bytes(NAME, b"good bytes")
    path = root / NAME
    path.write_bytes(b"evil bytes")  # corrupted at rest, same size
    actual = hashlib.sha256(b"evil bytes").hexdigest()

    with pytest.raises(IntegrityError) as excinfo:
        store.get_bytes(NAME, expected_sha256=stored.sha256)
    message = str(excinfo.value)
    assert NAME in message and stored.sha256 in message and actual in message

    dest_dir = tmp_path / "fetched"
    with pytest.raises(IntegrityError):
        store.get_file(NAME, dest_dir / "manifest.json", expected_sha256=stored.sha256)
    assert files_under(dest_dir) == []

    previous = dest_dir / "previous.json"
    previous.write_bytes(b"previous good copy")
    with pytest.raises(IntegrityError):
        store.get_file(NAME, previous, expected_sha256=stored.sha256)
    assert previous.read_bytes() == b"previous good copy"
    assert files_under(dest_dir) == ["previous.json"]


def test_missing_object_errors_name_the_object(store: ObjectStore, tmp_path: Path) -> None:
    missing = "profiles/nope/stats.safetensors"
    for call in (
        lambda: store.get_bytes(missing),
        lambda: store.get_file(missing, tmp_path / "x"),
        lambda: store.stat(missing),
    ):
        with pytest.raises(ObjectNotFoundError, match="profiles/nope/stats.safetensors"):
            call()
    assert not (tmp_path / "x").exists()


def test_put_file_of_a_missing_source_is_a_storage_error(
    store: ObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        store.put_file("a.bin", tmp_path / "does-not-exist")
    assert not store.exists("a.bin")


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
