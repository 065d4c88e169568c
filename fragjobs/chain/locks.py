"""Named locks over one catalog: first writer wins, concurrent writers wait and reuse.

A farm delivers every message at least once and runs identical chains side by side, so two
processes may profile the same prompt, extract the same fragment or rewrite the same manifest
at the same moment. Each of those writes happens under a lock named after what it writes
(``profile:<id>``, ``fragment:<key>``); the second process waits, then finds the first one's
rows and objects and reuses them, so concurrent chains converge on one profile and one
fragment and store and catalog never disagree.

On PostgreSQL a lock is a session-level advisory lock (keyed by the sha256 of its name) held
on a connection of its own: the server releases it if the process dies. On SQLite it is an
exclusive ``flock`` on ``<catalog file>.locks/<name>.lock`` (one machine, as SQLite itself).
Re-validation takes ``revalidate`` without waiting: a run that finds it taken does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

from fragjobs.catalog import mask_url
from fragjobs.chain.workspaces import Workspace
from fragjobs.errors import CatalogError

try:
    import fcntl
except ImportError:  # Windows: the SQLite lock is not available
    fcntl = None

log = logging.getLogger("fragjobs")

LOCK_ID = int.from_bytes(hashlib.sha256(b"fragjobs.revalidate").digest()[:8], "big", signed=True)
"""The PostgreSQL advisory lock key of re-validation (a signed 64-bit integer)."""

WRITE_LOCK_WAIT_S = 3600.0
"""How long a writer waits for another process writing the same thing (then it fails)."""

_POLL_S = 0.2


def lock_id(name: str) -> int:
    """The signed 64-bit advisory lock key of ``name`` (``revalidate`` → :data:`LOCK_ID`)."""
    seed = b"fragjobs.revalidate" if name == "revalidate" else f"fragjobs.{name}".encode()
    return int.from_bytes(hashlib.sha256(seed).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def named_lock(ws: Workspace, name: str, *, wait_s: float | None = None) -> Iterator[bool]:
    """Hold the lock ``name`` of ``ws``'s catalog; yield whether it was acquired.

    ``wait_s``: None never waits (a lock held elsewhere yields False); otherwise wait up to
    that many seconds, then raise.

    Raises:
        CatalogError: the PostgreSQL server cannot be reached, or the wait timed out.
    """
    from sqlalchemy.engine import make_url

    url = make_url(ws.catalog.url)
    if url.get_backend_name() == "postgresql":
        with _advisory_lock(ws.catalog.url, lock_id(name), name, wait_s) as acquired:
            yield acquired
        return
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database).expanduser()
        folder = path.with_name(path.name + ".locks")
    else:
        folder = ws.settings.data_dir / "locks"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    with _file_lock(folder / f"{safe}.lock", name, wait_s) as acquired:
        yield acquired


@contextlib.contextmanager
def revalidation_lock(ws: Workspace) -> Iterator[bool]:
    """Hold the re-validation lock (never waits); yield whether it was acquired."""
    with named_lock(ws, "revalidate") as acquired:
        yield acquired


@contextlib.contextmanager
def write_lock(ws: Workspace, name: str) -> Iterator[None]:
    """Hold ``name`` for a write, waiting up to :data:`WRITE_LOCK_WAIT_S` for another writer."""
    with named_lock(ws, name, wait_s=WRITE_LOCK_WAIT_S):
        yield


def _timed_out(name: str, wait_s: float) -> CatalogError:
    return CatalogError(
        f"lock {name!r} still held by another process after {wait_s:.0f} s; "
        "it is released when that process finishes or dies"
    )


@contextlib.contextmanager
def _advisory_lock(url: str, key: int, name: str, wait_s: float | None) -> Iterator[bool]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    try:
        try:
            connection = engine.connect()
            while True:
                acquired = bool(
                    connection.execute(
                        text("SELECT pg_try_advisory_lock(:id)"), {"id": key}
                    ).scalar()
                )
                connection.commit()  # the lock is the session's, not the transaction's
                if acquired or deadline is None:
                    break
                if time.monotonic() > deadline:
                    raise _timed_out(name, wait_s)
                time.sleep(_POLL_S)
        except SQLAlchemyError as exc:
            raise CatalogError(f"cannot take the lock {name!r} on {mask_url(url)}: {exc}") from exc
        try:
            yield acquired
        finally:
            with contextlib.suppress(SQLAlchemyError):
                if acquired:
                    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": key})
                    connection.commit()
            connection.close()  # ends the session, which releases the lock in any case
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path, name: str, wait_s: float | None) -> Iterator[bool]:
    if fcntl is None:
        log.warning("no file locks on this platform: %s is not serialised", name)
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    with path.open("ab") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is None:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise _timed_out(name, wait_s) from None
                time.sleep(_POLL_S)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
