"""The ObjectStore contract (fragjobs.storage.base), run on every backend.

Each test runs once per ``store`` param: a local folder, then an S3 bucket of moto's server
(the server fixtures live in tests/conftest.py; the S3 run is skipped, with the reason, when
moto is not installed). ``backing`` looks at the same objects without going through the store,
to see leftovers and to change bytes behind the store's back. What only one backend does is
tested in test_local_store.py and test_s3_store.py.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import pytest

from fragjobs.errors import IntegrityError, InvalidKeyError, ObjectNotFoundError, StorageError
from fragjobs.storage import LocalStore, ObjectStore, S3Store, StoredObject, open_store
from fragjobs.storage import base as storage_base

NAME = "fragments/tiny-sd/tiny-sd_0123456789abcdef_01234567/manifest.json"
BAD_NAMES = ["../escape", "a/../b", "/abs/path", "has space", "a//b", "", "./a", "a\\b"]


class Backing(Protocol):
    """What a store keeps, seen without going through the store."""

    def names(self) -> list[str]:
        """Sorted paths, relative to the store's root, of everything kept there, leftovers
        (temporary files, parts) included."""
        ...

    def is_untouched(self) -> bool:
        """Whether nothing has ever been written there."""
        ...

    def overwrite(self, name: str, data: bytes) -> None:
        """Replace the bytes of object ``name`` as corruption at rest would: no store call, and
        everything else the backend records about the object kept as it was."""
        ...


class LocalBacking:
    """The folder of a :class:`LocalStore`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()
        )

    def is_untouched(self) -> bool:
        return not self.root.exists()  # the store creates its folder on first write only

    def overwrite(self, name: str, data: bytes) -> None:
        self.root.joinpath(*name.split("/")).write_bytes(data)


class S3Backing:
    """The bucket of an :class:`S3Store`, through a plain boto3 client."""

    def __init__(self, admin: Any, bucket: str, prefix: str) -> None:
        self.admin = admin
        self.bucket = bucket
        self.root = f"{prefix}/" if prefix else ""

    def _keys(self, prefix: str) -> list[str]:
        pages = self.admin.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return [item["Key"] for page in pages for item in page.get("Contents", ())]

    def names(self) -> list[str]:
        return sorted(key.removeprefix(self.root) for key in self._keys(self.root))

    def is_untouched(self) -> bool:
        return self._keys("") == []

    def overwrite(self, name: str, data: bytes) -> None:
        key = self.root + name
        # Keeping the recorded sha256 too: the store must hash the bytes it reads.
        metadata = self.admin.head_object(Bucket=self.bucket, Key=key)["Metadata"]
        self.admin.put_object(Bucket=self.bucket, Key=key, Body=data, Metadata=metadata)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty store: a local folder, then an S3 bucket (``s3://<fresh bucket>/farm``)."""
    if request.param == "s3":
        return request.getfixturevalue("s3_store")
    return open_store((tmp_path / "store").as_uri())


@pytest.fixture
def backing(request: pytest.FixtureRequest, store: ObjectStore) -> Backing:
    """What ``store`` keeps, seen without going through it."""
    if isinstance(store, LocalStore):
        return LocalBacking(store.root)
    assert isinstance(store, S3Store)
    return S3Backing(request.getfixturevalue("s3_admin"), store.bucket, store.prefix)


def test_put_get_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    data = b"\x00\x01 fragment bytes" * 1000
    stored = store.put_bytes(NAME, data)

    assert stored == StoredObject(
        NAME, store.uri(NAME), hashlib.sha256(data).hexdigest(), len(data)
    )
    assert store.get_bytes(NAME, expected_sha256=stored.sha256) == data
    assert store.exists(NAME) and not store.exists(NAME + ".other")
    assert store.stat(NAME) == stored

    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * storage_base.CHUNK_SIZE + 17))  # several read chunks
    from_file = store.put_file("profiles/p1/stats.safetensors", source)
    assert from_file.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert from_file.size == source.stat().st_size
    dest = store.get_file(from_file.name, tmp_path / "out" / "copy.bin", from_file.sha256)
    assert dest.read_bytes() == source.read_bytes()


def test_uri_is_the_store_url_and_the_name(store: ObjectStore) -> None:
    assert store.uri("a/b.json") == f"{store.url}/a/b.json"
    assert not store.exists("a/b.json")  # the object need not exist


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
    assert store.list("nothing/") == []
    assert not store.exists("profiles/p1")  # a folder is not an object

    store.delete("top.json")
    store.delete("top.json")  # missing is fine
    assert not store.exists("top.json")

    assert store.delete_prefix("profiles/p1/") == 2
    assert store.list() == ["profiles/p2/x.json"]
    with pytest.raises(InvalidKeyError, match="non-empty prefix"):
        store.delete_prefix("")


def test_put_replaces_the_object_and_leaves_nothing_else(
    store: ObjectStore, backing: Backing
) -> None:
    store.put_bytes(NAME, b"version 1")
    store.put_bytes(NAME, b"version 2")

    assert store.get_bytes(NAME) == b"version 2"
    assert backing.names() == [NAME]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_rejected_before_writing(
    store: ObjectStore, backing: Backing, tmp_path: Path, name: str
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
    assert backing.is_untouched()
    assert not (tmp_path / "dest").exists()


def test_list_refuses_an_escaping_prefix(store: ObjectStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.list("../")


def test_bytes_changed_at_rest_raise_and_leave_nothing_at_dest(
    store: ObjectStore, backing: Backing, tmp_path: Path
) -> None:
    stored = store.put_bytes(NAME, b"good bytes")
    backing.overwrite(NAME, b"evil bytes")  # corrupted at rest, same size
    actual = hashlib.sha256(b"evil bytes").hexdigest()

    with pytest.raises(IntegrityError) as excinfo:
        store.get_bytes(NAME, expected_sha256=stored.sha256)
    message = str(excinfo.value)
    assert NAME in message and stored.sha256 in message and actual in message

    dest_dir = tmp_path / "fetched"
    with pytest.raises(IntegrityError):
        store.get_file(NAME, dest_dir / "manifest.json", expected_sha256=stored.sha256)
    assert os.listdir(dest_dir) == []

    previous = dest_dir / "previous.json"
    previous.write_bytes(b"previous good copy")
    with pytest.raises(IntegrityError):
        store.get_file(NAME, previous, expected_sha256=stored.sha256)
    assert previous.read_bytes() == b"previous good copy"
    assert os.listdir(dest_dir) == ["previous.json"]


def test_one_flipped_byte_is_caught(store: ObjectStore, backing: Backing, tmp_path: Path) -> None:
    data = os.urandom(2 * storage_base.CHUNK_SIZE + 5)
    stored = store.put_bytes(NAME, data)
    flipped = bytearray(data)
    flipped[-1] ^= 0x01  # in the last read chunk
    backing.overwrite(NAME, bytes(flipped))

    with pytest.raises(IntegrityError, match=hashlib.sha256(flipped).hexdigest()):
        store.get_bytes(NAME, expected_sha256=stored.sha256)
    with pytest.raises(IntegrityError, match=stored.sha256):
        store.get_file(NAME, tmp_path / "copy.bin", expected_sha256=stored.sha256)
    assert not (tmp_path / "copy.bin").exists()


def test_wrong_expected_sha256_is_refused_and_leaves_no_file(
    store: ObjectStore, tmp_path: Path
) -> None:
    store.put_bytes(NAME, b"good bytes")
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    dest_dir = tmp_path / "fetched"

    with pytest.raises(IntegrityError, match=wrong):
        store.get_file(NAME, dest_dir / "manifest.json", expected_sha256=wrong)
    assert os.listdir(dest_dir) == []


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
    assert not store.exists(missing)
    store.delete(missing)  # missing is fine


def test_put_file_of_a_missing_source_is_a_storage_error(
    store: ObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        store.put_file("a.bin", tmp_path / "does-not-exist")
    assert not store.exists("a.bin")
