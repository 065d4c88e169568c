"""The doctor's checks of the services: the catalog database, the store, the farm's broker.

A server that does not answer fails its check in seconds (database and broker
``connect_timeout`` :data:`~fragjobs.doctor.outcome.CONNECT_TIMEOUT_S`, S3 connect and read
timeouts, one attempt). Heavy modules (sqlalchemy, boto3, redis) are imported inside the checks.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fragjobs.config import Settings
from fragjobs.doctor.outcome import CONNECT_TIMEOUT_S, FAIL, OK, WARN, Check, one_line
from fragjobs.errors import FragjobsError

PROBE_PREFIX = "doctor-probe-"
"""Names of the store's probe objects, at its root (fragjobs' own objects are in folders)."""


def with_connect_timeout(url: str) -> str:
    """``url`` with ``connect_timeout`` for a PostgreSQL server (unless it has one)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return url
    return parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)}).render_as_string(
        hide_password=False
    )


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL naming one; None for any other database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else Path(database).expanduser()


def check_database(settings: Settings) -> Check:
    """The catalog database answers and is at this code's schema revision.

    The embedded SQLite file is created and upgraded by any command that opens it, so a
    missing or older one is only reported; a server database (PostgreSQL) behind this code's
    revision fails with the command that fixes it.
    """
    from fragjobs.catalog import UPGRADE_COMMAND, current_revision, head_revision, mask_url

    url = probe = settings.resolved_database_url
    try:
        shown, head = mask_url(url), head_revision()
        sqlite = sqlite_file(url)
        if sqlite is not None and not sqlite.is_file():
            return Check(
                "database",
                OK,
                f"{shown} not created yet: the embedded catalog is made at schema {head} on "
                "first use",
            )
        probe = with_connect_timeout(url)
        current = current_revision(probe)
    except FragjobsError as exc:
        return Check(
            "database",
            FAIL,
            one_line(exc).replace(mask_url(probe), shown) if probe != url else one_line(exc),
            "start the database server or correct FRAGJOBS_DATABASE_URL",
        )
    if current == head:
        return Check("database", OK, f"{shown} at schema {head}")
    state = "has no fragjobs schema" if current is None else f"is at schema {current}"
    detail = f"{shown} {state}, this fragjobs needs {head}"
    fix = f"run: {UPGRADE_COMMAND}"
    if sqlite is not None:
        return Check(
            "database", WARN, f"{detail}; upgraded when a command opens it", fix, needed=False
        )
    return Check("database", FAIL, detail, fix)


def check_store(settings: Settings) -> Check:
    """A probe object is written, read back, its sha256 checked, and deleted.

    The probe is named ``doctor-probe-<random>`` at the store's root; it is deleted whatever
    happens once written, and the check fails if it is still there afterwards.
    """
    from fragjobs.storage import open_store

    url = settings.resolved_storage_url
    s3 = urlsplit(url).scheme.lower() == "s3"
    fix = (
        "check that the bucket of FRAGJOBS_STORAGE_URL exists (fragjobs never creates "
        "buckets), FRAGJOBS_S3_ENDPOINT_URL and the AWS credentials"
        if s3
        else "point FRAGJOBS_STORAGE_URL (or FRAGJOBS_DATA_DIR) at a folder this user can write"
    )
    kwargs: dict[str, Any] = (
        {
            "settings": settings,
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": 2 * CONNECT_TIMEOUT_S,
            "max_attempts": 1,
        }
        if s3
        else {}
    )
    data = b"fragjobs doctor probe\n" + os.urandom(32)
    expected = hashlib.sha256(data).hexdigest()
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        store = open_store(url, **kwargs)
        written = store.put_bytes(name, data)
        try:
            read = store.get_bytes(name, expected_sha256=expected)
        finally:
            store.delete(name)
        left = store.exists(name)
    except FragjobsError as exc:
        return Check("store", FAIL, one_line(exc), fix)
    if written.sha256 != expected or read != data:
        return Check("store", FAIL, f"{store.url}: the probe object came back changed", fix)
    if left:
        return Check("store", FAIL, f"{store.url}: the probe object {name} was not deleted", fix)
    return Check("store", OK, f"{store.url}: probe object written, read, sha256 checked, deleted")


def recorded_ids(settings: Settings) -> dict[str, str]:
    """The catalog's base-model ids by source (``builtin:NAME``); empty when it cannot say
    (the database check reports why)."""
    from fragjobs.catalog import Catalog

    sqlite = sqlite_file(settings.resolved_database_url)
    if sqlite is not None and not sqlite.is_file():
        return {}
    try:
        catalog = Catalog(with_connect_timeout(settings.resolved_database_url))
    except FragjobsError:
        return {}
    try:
        return {base.source: base.sha256 for base in catalog.list_base_models()}
    except FragjobsError:
        return {}
    finally:
        catalog.dispose()


def check_farm_settings(settings: Settings) -> Check:
    """The farm's own settings load (task limits, no placeholder secrets)."""
    from fragjobs.farm.doctor_checks import check_farm_settings as farm_settings

    try:
        return Check("farm settings", OK, farm_settings())
    except FragjobsError as exc:
        return Check("farm settings", FAIL, one_line(exc), "correct the FRAGJOBS_* variable")


def check_broker(settings: Settings) -> Check:
    """The broker answers within :data:`CONNECT_TIMEOUT_S`."""
    from fragjobs.farm.doctor_checks import ping_broker

    try:
        return Check("broker", OK, ping_broker(settings.broker_url, CONNECT_TIMEOUT_S))
    except FragjobsError as exc:
        return Check(
            "broker",
            FAIL,
            one_line(exc),
            "start the broker (Redis) or correct FRAGJOBS_BROKER_URL",
        )
