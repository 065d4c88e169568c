"""The re-validation lock: two runs over one catalog never overlap.

On PostgreSQL a session-level advisory lock held on a connection of its own for the whole
run (the server releases it if the process dies); on SQLite an exclusive ``flock`` on
``<catalog file>.revalidate.lock`` (one machine, as SQLite itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
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


@contextlib.contextmanager
def revalidation_lock(ws: Workspace) -> Iterator[bool]:
    """Hold the re-validation lock of ``ws``'s catalog; yield whether it was acquired.

    Never waits: a lock held by another run yields False. PostgreSQL: advisory lock
    :data:`LOCK_ID` on a connection of its own. SQLite: ``flock`` on
    ``<catalog file>.revalidate.lock``. Any other database: ``flock`` on
    ``<data dir>/revalidate.lock`` (this machine only).

    Raises:
        CatalogError: the PostgreSQL server cannot be reached.
    """
    from sqlalchemy.engine import make_url

    url = make_url(ws.catalog.url)
    if url.get_backend_name() == "postgresql":
        with _advisory_lock(ws.catalog.url) as acquired:
            yield acquired
        return
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database).expanduser()
        lock_path = path.with_name(path.name + ".revalidate.lock")
    else:
        lock_path = ws.settings.data_dir / "revalidate.lock"
    with _file_lock(lock_path) as acquired:
        yield acquired


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[bool]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        try:
            connection = engine.connect()
            acquired = bool(
                connection.execute(
                    text("SELECT pg_try_advisory_lock(:id)"), {"id": LOCK_ID}
                ).scalar()
            )
            connection.commit()  # the lock is the session's, not the transaction's
        except SQLAlchemyError as exc:
            raise CatalogError(
                f"cannot take the re-validation lock on {mask_url(url)}: {exc}"
            ) from exc
        try:
            yield acquired
        finally:
            with contextlib.suppress(SQLAlchemyError):
                if acquired:
                    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
                    connection.commit()
            connection.close()  # ends the session, which releases the lock in any case
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    if fcntl is None:
        log.warning("no file locks on this platform: re-validation runs are not serialised")
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
