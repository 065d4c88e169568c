"""S3 backend: ``s3://bucket/prefix`` → objects ``prefix/<name>`` in an S3-compatible bucket.

Works with AWS S3, MinIO or any S3-compatible server: the endpoint comes from the
``endpoint_url`` argument or ``FRAGJOBS_S3_ENDPOINT_URL``, the credentials from the standard AWS
chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles, ...).
boto3 is imported when the first :class:`S3Store` is made, so users of local folders never
need it.

Transfers go through boto3's managed transfer, so objects above ``multipart_threshold`` are
sent and fetched in parts, in parallel. Every object carries its sha256 as user metadata
(``x-amz-meta-sha256``), which lets :meth:`S3Store.stat` describe an object without
downloading it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fragjobs.errors import (
    InvalidKeyError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
)
from fragjobs.keys import check_int, validate_object_name
from fragjobs.storage.base import ObjectStore, Readable, StoredObject, read_chunks

if TYPE_CHECKING:
    from fragjobs.config import Settings

DEFAULT_PART_SIZE = 8 * 2**20
"""Default multipart threshold and part size (8 MiB, boto3's own default)."""

SHA256_METADATA_KEY = "sha256"
"""User-metadata key of an object's sha256 (sent as the ``x-amz-meta-sha256`` header)."""

DELETE_BATCH_SIZE = 1000
"""The most keys one S3 ``DeleteObjects`` request accepts."""

_BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Codes a later retry can succeed on; any 5xx status is treated the same way.
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "PreconditionFailed",  # the object was replaced during a multipart download
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
    }
)
_ACCESS_CODES = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
)


class S3Store(ObjectStore):
    """An object store in an S3 bucket (AWS S3, MinIO, any S3-compatible server).

    Object ``name`` is stored under the key ``<prefix>/<name>``. Every upload is atomic (S3
    shows an object only once all of it has arrived); the bucket must already exist —
    fragjobs never creates buckets.

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        endpoint_url: the S3 endpoint, such as ``http://minio:9000``; default
            ``settings.s3_endpoint_url`` (``FRAGJOBS_S3_ENDPOINT_URL``), else AWS S3.
        region: the region; default ``settings.s3_region``.
        settings: where the defaults come from; default :func:`fragjobs.config.get_settings`.
        multipart_threshold: objects of at least this many bytes are transferred in parts.
        multipart_chunksize: the size of one part (S3 raises anything below 5 MiB to 5 MiB).
        max_concurrency: how many parts of one object are transferred at once.
        connect_timeout: seconds to wait for a connection to the endpoint.
        read_timeout: seconds to wait for data on an open connection.
        max_attempts: attempts per request, the first included (1 = no retries).

    Raises:
        StorageError: ``url`` is not an S3 URL, boto3 is not installed, or the endpoint URL
            is malformed. Nothing is sent to the endpoint until the store is first used.

    Example::

        store = S3Store("s3://fragments/prod", endpoint_url="http://minio:9000")
        obj = store.put_file("profiles/p1/stats.safetensors", Path("stats.safetensors"))
        store.stat(obj.name).sha256 == obj.sha256  # from metadata: nothing downloaded
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        settings: Settings | None = None,
        multipart_threshold: int = DEFAULT_PART_SIZE,
        multipart_chunksize: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        self.bucket, self.prefix = _parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        if settings is None:
            from fragjobs.config import get_settings

            settings = get_settings()
        endpoint_url = endpoint_url or settings.s3_endpoint_url
        self.region = region or settings.s3_region
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
            from s3transfer.exceptions import RetriesExceededError
        except ImportError as exc:
            raise StorageError(
                f"the s3:// backend needs boto3 ({exc}); install it with "
                "pip install 'fragjobs[farm]'"
            ) from exc
        self._boto_errors = (BotoCoreError, ClientError, RetriesExceededError)
        self._transfer = TransferConfig(
            multipart_threshold=check_int(multipart_threshold, "multipart_threshold", minimum=1),
            multipart_chunksize=check_int(multipart_chunksize, "multipart_chunksize", minimum=1),
            max_concurrency=check_int(max_concurrency, "max_concurrency", minimum=1),
        )
        config = Config(
            region_name=self.region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={
                "total_max_attempts": check_int(max_attempts, "max_attempts", minimum=1),
                "mode": "standard",
            },
            # Self-hosted servers (MinIO) rarely have a DNS name per bucket.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        try:
            # A session of its own: boto3's default session is not safe to share between threads.
            self._client: Any = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, config=config
            )
        except ValueError as exc:
            raise StorageError(
                f"invalid S3 endpoint {endpoint_url!r} ({exc}); set FRAGJOBS_S3_ENDPOINT_URL "
                "to a URL such as http://minio:9000"
            ) from exc
        self.endpoint_url: str = self._client.meta.endpoint_url
        self._bucket_checked = False

    # -- ObjectStore primitives ------------------------------------------------------------

    def _write_stream(self, name: str, stream: Readable) -> None:
        self._ensure_bucket()
        # S3 takes metadata before the body, and the sha256 is known only after the last
        # byte: spool the body (in memory up to the multipart threshold, on disk beyond).
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=self._transfer.multipart_threshold) as spool:
            try:
                for chunk in read_chunks(name, stream):
                    digest.update(chunk)
                    spool.write(chunk)
                spool.seek(0)
            except OSError as exc:
                raise StorageError(
                    f"cannot spool object {name!r} to a temporary file before upload: {exc}"
                ) from exc
            with self._translated(f"upload object {name!r}"):
                self._client.upload_fileobj(
                    spool,
                    self.bucket,
                    self._key(name),
                    ExtraArgs={"Metadata": {SHA256_METADATA_KEY: digest.hexdigest()}},
                    Config=self._transfer,
                )

    @contextlib.contextmanager
    def _open_read(self, name: str) -> Iterator[Readable]:
        self._ensure_bucket()
        action = f"download object {name!r}"
        with self._translated(action, name):
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
        body = response["Body"]
        if response.get("ContentLength", 0) <= self._transfer.multipart_threshold:
            # One request, streamed: a managed transfer's extra round trips and temp file
            # cost several times the transfer itself for objects of this size.
            try:
                with self._translated(action, name):
                    yield body
            finally:
                body.close()
            return
        body.close()  # large object: ranged parts in parallel through the managed transfer
        with tempfile.SpooledTemporaryFile(max_size=self._transfer.multipart_threshold) as spool:
            with self._translated(f"download object {name!r}", name):
                self._client.download_fileobj(
                    self.bucket, self._key(name), spool, Config=self._transfer
                )
            spool.seek(0)
            yield spool

    def _exists(self, name: str) -> bool:
        try:
            self._head(name)
        except ObjectNotFoundError:
            return False
        return True

    def _delete(self, name: str) -> None:
        self._ensure_bucket()
        with self._translated(f"delete object {name!r}"):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def _list(self, prefix: str) -> Iterator[str]:
        self._ensure_bucket()
        root = self._key("")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=root + prefix
        )
        with self._translated(f"list objects under {prefix!r}"):
            for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"][len(root) :]
                    # Keys written by other tools ("folder/" markers, spaces) are not objects
                    # of this store: no public method could read them by name.
                    if _is_object_name(name):
                        yield name

    # -- overrides that use what S3 offers --------------------------------------------------

    def stat(self, name: str, *, verify: bool = False) -> StoredObject:
        """Describe ``name`` from its metadata, without downloading it when possible.

        The sha256 is the one recorded when the object was uploaded through a store
        (``x-amz-meta-sha256``). An object without that metadata (written by another tool)
        is downloaded and hashed. Metadata cannot reveal bytes corrupted at rest: to check
        the stored bytes themselves, pass ``verify=True`` (always download and hash) or read
        with ``expected_sha256``.

        Raises:
            ObjectNotFoundError: ``name`` does not exist.
        """
        validate_object_name(name)
        if not verify:
            head = self._head(name)
            recorded = head.get("Metadata", {}).get(SHA256_METADATA_KEY, "")
            if _SHA256_PATTERN.match(recorded):
                return StoredObject(name, self.uri(name), recorded, int(head["ContentLength"]))
        return super().stat(name)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose name starts with ``prefix``, 1000 per request.

        Returns how many objects were deleted. An empty prefix is refused: it would empty
        the whole store.

        Raises:
            StorageError: S3 refused to delete some of them (the first one is named).
        """
        if not prefix:
            return super().delete_prefix(prefix)  # refuses, with the message every store gives
        names = self.list(prefix)
        for start in range(0, len(names), DELETE_BATCH_SIZE):
            batch = names[start : start + DELETE_BATCH_SIZE]
            with self._translated(f"delete objects under {prefix!r}"):
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(n)} for n in batch], "Quiet": True},
                )
            if failures := response.get("Errors"):
                first = failures[0]
                codes = {str(f.get("Code", "")) for f in failures}
                error = StorageUnavailableError if codes <= _TRANSIENT_CODES else StorageError
                raise error(
                    f"cannot delete {len(failures)} of the objects under {prefix!r} in "
                    f"{self.url}; first {first.get('Key')!r}: {first.get('Code')} "
                    f"{first.get('Message', '')}".rstrip()
                )
        return len(names)

    # -- helpers ---------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _head(self, name: str) -> dict[str, Any]:
        self._ensure_bucket()
        with self._translated(f"read the metadata of object {name!r}", name):
            return self._client.head_object(Bucket=self.bucket, Key=self._key(name))

    def _ensure_bucket(self) -> None:
        """Check once per store that the bucket exists, so a missing one is named as such."""
        if self._bucket_checked:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except self._boto_errors as exc:
            # HeadBucket needs s3:ListBucket, which a least-privilege policy may not grant;
            # then the object requests themselves will say whether access is allowed.
            if _http_status(exc) != 403:
                raise self._error(exc, f"open bucket {self.bucket!r}", None) from exc
        self._bucket_checked = True

    @contextlib.contextmanager
    def _translated(self, action: str, name: str | None = None) -> Iterator[None]:
        """Turn boto3/botocore errors raised inside into fragjobs errors.

        ``name`` is the object the request is about; without it, "not found" means the
        bucket is missing.
        """
        try:
            yield
        except self._boto_errors as exc:
            raise self._error(exc, action, name) from exc
        except OSError as exc:
            raise StorageError(f"cannot {action} in {self.url}: local I/O error: {exc}") from exc

    def _error(self, exc: Exception, action: str, name: str | None) -> StorageError:
        from botocore import exceptions as boto
        from s3transfer.exceptions import RetriesExceededError

        where = f"{self.url} at {self.endpoint_url}"
        if isinstance(exc, boto.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = _http_status(exc)
            if code == "NoSuchBucket" or (name is None and code in _NOT_FOUND_CODES):
                return StorageError(
                    f"the S3 bucket {self.bucket!r} does not exist at {self.endpoint_url}; "
                    f"create it first (aws s3 mb s3://{self.bucket}, or mc mb for MinIO): "
                    "fragjobs never creates buckets"
                )
            if code in _NOT_FOUND_CODES:
                return ObjectNotFoundError(f"object {name!r} not found in {self.url}")
            if code in _TRANSIENT_CODES or status >= 500:
                return StorageUnavailableError(
                    f"cannot {action} in {where}: the server answered {code or status}; "
                    "this is usually temporary, retry later"
                )
            if code in _ACCESS_CODES or status == 403:
                return StorageError(
                    f"cannot {action} in {where}: access denied ({code}); check the AWS "
                    "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and "
                    "the bucket policy"
                )
            return StorageError(f"cannot {action} in {where}: {exc}")
        if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
            return StorageError(
                f"cannot {action} in {where}: no usable AWS credentials ({exc}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        transient = (
            boto.ConnectionError,
            boto.HTTPClientError,
            boto.IncompleteReadError,
            RetriesExceededError,
        )
        if isinstance(exc, transient):
            return StorageUnavailableError(
                f"cannot {action}: the S3 endpoint {self.endpoint_url} is unreachable or dropped "
                f"the connection ({exc}); check FRAGJOBS_S3_ENDPOINT_URL and that the server is "
                "running, then retry"
            )
        return StorageError(f"cannot {action} in {where}: {exc}")


def _parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    parts = urlsplit(str(url))
    if parts.scheme.lower() != "s3" or parts.query or parts.fragment:
        raise StorageError(f"S3Store needs a URL of the form s3://bucket/prefix, got {url!r}")
    if not _BUCKET_PATTERN.match(parts.netloc) or ".." in parts.netloc:
        raise StorageError(
            f"invalid S3 bucket name {parts.netloc!r} in {url!r}: 3 to 63 lower-case letters, "
            "digits, '.' and '-', starting and ending with a letter or digit"
        )
    prefix = parts.path.strip("/")
    if prefix and not _is_object_name(prefix):
        raise StorageError(
            f"invalid prefix {prefix!r} in {url!r}: segments of [A-Za-z0-9._-] separated by '/'"
        )
    return parts.netloc, prefix


def _http_status(exc: Exception) -> int:
    """The HTTP status of a botocore ClientError (0 for any other exception)."""
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_object_name(name: str) -> bool:
    try:
        validate_object_name(name)
    except InvalidKeyError:
        return False
    return True
