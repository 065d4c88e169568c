"""The catalog's database connection: URL parsing and masking, engines, error translation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from fragjobs.errors import CatalogError


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except sa_exc.ArgumentError as exc:
        raise CatalogError(
            "invalid catalog database URL: use a SQLAlchemy URL such as "
            "sqlite:////abs/catalog.db or postgresql+psycopg://user@host/db"
        ) from exc


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    return _parse_url(url).render_as_string(hide_password=True)


def _is_sqlite(url: str) -> bool:
    return _parse_url(url).get_backend_name() == "sqlite"


def _describe(exc: sa_exc.SQLAlchemyError, url: str) -> str:
    detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
    if isinstance(exc, sa_exc.IntegrityError):
        return f"catalog constraint violated: {detail}"
    if isinstance(exc, sa_exc.OperationalError):
        return f"catalog database {mask_url(url)} failed or is unreachable: {detail}"
    return f"catalog database error on {mask_url(url)}: {detail}"


@contextmanager
def _catalog_errors(url: str) -> Iterator[None]:
    """Turn SQLAlchemy errors raised inside the block into CatalogError."""
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        raise CatalogError(_describe(exc, url)) from exc


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    # SQLite ignores foreign keys (and ON DELETE) unless asked, per connection.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _create_engine(url: str) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is created first."""
    parsed = _parse_url(url)
    try:
        if parsed.get_backend_name() != "sqlite":
            return create_engine(parsed, pool_pre_ping=True)
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # A writer waits for another one instead of failing at once with "database is locked".
        engine = create_engine(parsed, connect_args={"timeout": 30})
    except (ImportError, sa_exc.ArgumentError) as exc:
        raise CatalogError(
            f"cannot open catalog {mask_url(url)} ({exc}); for PostgreSQL install the "
            "driver with pip install 'fragjobs[farm]'"
        ) from exc
    except OSError as exc:
        raise CatalogError(f"cannot create the folder of catalog {mask_url(url)}: {exc}") from exc
    event.listen(engine, "connect", _enable_sqlite_foreign_keys)
    return engine
