"""What only S3Store does, against moto's S3 server over HTTP: sha256 metadata, multipart
transfers, batch deletes, bucket and endpoint errors, URL and settings handling.

The contract every store keeps is in test_store_contract.py. The server fixtures
(``moto_endpoint``, ``aws_env``, ``s3_admin``, ``s3_bucket``, ``s3_store``) live in
tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from fragjobs.config import get_settings
from fragjobs.errors import ObjectNotFoundError, StorageError, StorageUnavailableError
from fragjobs.storage import S3Store, StoredObject, open_store
from fragjobs.storage import s3 as s3_module

MiB = 2**20
NAME = "fragments/tiny-sd/tiny-sd_0123456789abcdef_01234567/manifest.json"
REGION = "us-east-1"


def test_round_trip_records_sha256_metadata(
    s3_store: S3Store, s3_admin: Any, s3_bucket: str
) -> None:
    data = b"\x00\x01 fragment bytes" * 1000
    stored = s3_store.put_bytes(NAME, data)

    sha = hashlib.sha256(data).hexdigest()
    assert stored == StoredObject(NAME, f"s3://{s3_bucket}/farm/{NAME}", sha, len(data))
    head = s3_admin.head_object(Bucket=s3_bucket, Key=f"farm/{NAME}")
    assert head["Metadata"] == {"sha256": sha}
    assert head["ContentLength"] == len(data)
    assert s3_store.stat(NAME) == stored == s3_store.stat(NAME, verify=True)


def test_large_file_is_transferred_in_parts(
    s3_store: S3Store, s3_admin: Any, s3_bucket: str, tmp_path: Path
) -> None:
    source = tmp_path / "fragment.safetensors"
    source.write_bytes(os.urandom(12 * MiB + 123))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()

    stored = s3_store.put_file("fragments/tiny-sd/k/fragment.safetensors", source)

    head = s3_admin.head_object(Bucket=s3_bucket, Key=f"farm/{stored.name}")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2.x MiB: a 3-part upload
    assert head["Metadata"]["sha256"] == sha == stored.sha256
    assert s3_store.stat(stored.name) == stored
    dest = s3_store.get_file(stored.name, tmp_path / "fetched.safetensors", sha)
    assert dest.read_bytes() == source.read_bytes()  # a ranged, parallel download


def test_object_replaced_behind_the_stores_back(
    s3_store: S3Store, s3_admin: Any, s3_bucket: str
) -> None:
    stored = s3_store.put_bytes(NAME, b"good bytes")
    evil_sha = hashlib.sha256(b"evil bytes").hexdigest()
    # Replaced by another tool that even copied the old metadata.
    s3_admin.put_object(
        Bucket=s3_bucket, Key=f"farm/{NAME}", Body=b"evil bytes", Metadata={"sha256": stored.sha256}
    )

    assert s3_store.stat(NAME).sha256 == stored.sha256  # metadata, as documented
    assert s3_store.stat(NAME, verify=True).sha256 == evil_sha

    s3_admin.put_object(Bucket=s3_bucket, Key=f"farm/{NAME}", Body=b"evil bytes")
    assert s3_store.stat(NAME).sha256 == evil_sha  # no metadata: streamed and hashed


def test_list_and_delete_prefix_in_batches(
    s3_store: S3Store, s3_admin: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"profiles/p1/{i}.json" for i in range(5)] + ["profiles/p2/x.json", "top.json"]
    for name in names:
        s3_store.put_bytes(name, name.encode())
    # Outside the store's prefix, or not a valid object name: never listed.
    for key in ("farmer/profiles/p1/z.json", "other/a.json", "farm/profiles/p1/folder/"):
        s3_admin.put_object(Bucket=s3_bucket, Key=key, Body=b"")

    assert s3_store.list() == sorted(names)
    assert s3_store.list("profiles/p1/") == sorted(names[:5])

    batches: list[int] = []
    delete_objects = s3_store._client.delete_objects

    def recording_delete_objects(**kwargs: Any) -> Any:
        batches.append(len(kwargs["Delete"]["Objects"]))
        return delete_objects(**kwargs)

    monkeypatch.setattr(s3_module, "DELETE_BATCH_SIZE", 2)
    monkeypatch.setattr(s3_store._client, "delete_objects", recording_delete_objects)
    assert s3_store.delete_prefix("profiles/p1/") == 5
    assert batches == [2, 2, 1]
    assert s3_store.list() == ["profiles/p2/x.json", "top.json"]
    assert s3_admin.head_object(Bucket=s3_bucket, Key="farmer/profiles/p1/z.json")


def test_missing_bucket_is_named_and_never_created(
    moto_endpoint: str, s3_admin: Any, aws_env: None
) -> None:
    store = S3Store("s3://no-such-bucket-here/p", endpoint_url=moto_endpoint, region=REGION)
    for call in (
        lambda: store.put_bytes(NAME, b"x"),
        lambda: store.get_bytes(NAME),
        lambda: store.exists(NAME),
        lambda: store.list(),
    ):
        with pytest.raises(StorageError, match="'no-such-bucket-here' does not exist") as excinfo:
            call()
        assert "create it" in str(excinfo.value)
        assert not isinstance(excinfo.value, StorageUnavailableError | ObjectNotFoundError)
    buckets = [b["Name"] for b in s3_admin.list_buckets()["Buckets"]]
    assert "no-such-bucket-here" not in buckets


def test_unreachable_endpoint_fails_fast_as_unavailable(aws_env: None) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    store = S3Store(
        "s3://bucket/p", endpoint_url=endpoint, connect_timeout=1, read_timeout=1, max_attempts=1
    )

    started = time.monotonic()
    for call in (lambda: store.put_bytes(NAME, b"x"), lambda: store.get_bytes(NAME)):
        with pytest.raises(StorageUnavailableError, match=endpoint) as excinfo:
            call()
        assert isinstance(excinfo.value, StorageError)
        assert "FRAGJOBS_S3_ENDPOINT_URL" in str(excinfo.value)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("AccessDenied", 403, False),
        ("InvalidArgument", 400, False),
    ],
)
def test_server_errors_are_transient_only_when_retrying_can_help(
    s3_store: S3Store, code: str, status: int, transient: bool
) -> None:
    from botocore.stub import Stubber

    with Stubber(s3_store._client) as stubber:
        stubber.add_response("head_bucket", {})
        stubber.add_client_error("head_object", code, "stubbed", status)
        with pytest.raises(StorageError, match=code) as excinfo:
            s3_store.exists(NAME)
    assert isinstance(excinfo.value, StorageUnavailableError) == transient
    if code == "AccessDenied":
        assert "AWS_ACCESS_KEY_ID" in str(excinfo.value)


def test_bucket_check_denied_by_policy_does_not_block_object_access(s3_store: S3Store) -> None:
    from botocore.stub import Stubber

    with Stubber(s3_store._client) as stubber:
        stubber.add_client_error("head_bucket", "403", "Forbidden", 403)
        stubber.add_response("head_object", {"ContentLength": 2, "Metadata": {}})
        assert s3_store.exists(NAME)


def test_open_store_dispatches_s3_urls(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    store = open_store(f"s3://{s3_bucket}/prefix/", endpoint_url=moto_endpoint)
    assert isinstance(store, S3Store)
    assert store.url == f"s3://{s3_bucket}/prefix"
    stored = store.put_bytes("a/b.json", b"{}")
    assert stored.uri == f"s3://{s3_bucket}/prefix/a/b.json"

    # The farm sets only the environment.
    monkeypatch.setenv("FRAGJOBS_S3_ENDPOINT_URL", moto_endpoint)
    get_settings.cache_clear()
    from_env = open_store(f"s3://{s3_bucket}/prefix")
    assert from_env.endpoint_url == moto_endpoint.rstrip("/")
    assert from_env.get_bytes("a/b.json", expected_sha256=stored.sha256) == b"{}"
    assert open_store(f"s3://{s3_bucket}").list() == ["prefix/a/b.json"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://Bad_Bucket/p", "invalid S3 bucket name"),
        ("s3://ab/p", "invalid S3 bucket name"),
        ("s3:///p", "invalid S3 bucket name"),
        ("s3://bucket/has space", "invalid prefix"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("s3://bucket/p?versionId=1", "s3://bucket/prefix"),
        ("file:///tmp/x", "s3://bucket/prefix"),
    ],
)
def test_invalid_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        S3Store(url, endpoint_url="http://127.0.0.1:1")


def test_invalid_endpoint_is_refused(aws_env: None) -> None:
    with pytest.raises(StorageError, match="FRAGJOBS_S3_ENDPOINT_URL"):
        S3Store("s3://bucket/p", endpoint_url="not a url")
