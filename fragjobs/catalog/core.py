"""The core every entity mixin of :class:`~fragjobs.catalog.catalog.Catalog` builds on.

It owns the engine, checks the schema on open, and gives the two primitives the entity
methods use: one transaction scope (:meth:`CatalogCore._transaction`) and an idempotent
insert (:meth:`CatalogCore._insert_or_get`).

Every write is idempotent: ``get_or_create_*``, ``create_*`` and ``add_image`` insert a row or
return the one that is already there, so a task retried after a crash continues with its row
instead of inserting a second one. Two concurrent callers are safe too: the loser of the race
hits a unique constraint, rolls back and reads the winner's row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from fragjobs.catalog.database import _catalog_errors, _create_engine, mask_url
from fragjobs.catalog.entities import E
from fragjobs.catalog.schema import _revision_of, _schema_error, head_revision
from models import Base

R = TypeVar("R", bound=Base)


class CatalogCore:
    """The connection to one catalog database and its transaction scope.

    The constructor's arguments and errors are documented on
    :class:`~fragjobs.catalog.catalog.Catalog`.
    """

    def __init__(self, url: str, *, check_schema: bool = True) -> None:
        self.url = url
        self._engine = _create_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        if check_schema:
            try:
                current = _revision_of(self._engine, url)
                if current != head_revision():
                    raise _schema_error(url, current)
            except BaseException:
                self._engine.dispose()
                raise

    def __repr__(self) -> str:
        return f"Catalog({mask_url(self.url)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    def dispose(self) -> None:
        """Close every pooled connection (the catalog can still be used afterwards)."""
        self._engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error, errors → CatalogError."""
        # Closing the session rolls back whatever was not committed.
        with _catalog_errors(self.url), self._sessions() as session:
            yield session
            session.commit()

    def _insert_or_get(
        self,
        find: Callable[[Session], R | None],
        make: Callable[[Session], R],
        to_entity: Callable[[R], E],
    ) -> tuple[E, bool]:
        """Return ``(entity, True)`` for a new row, ``(entity, False)`` for an existing one."""
        with self._transaction() as session:
            row = find(session)
            if row is not None:
                return to_entity(row), False
            row = make(session)
            session.add(row)
            try:
                session.flush()
            except sa_exc.IntegrityError:
                # A concurrent caller inserted the same unique key after our read.
                session.rollback()
                row = find(session)
                if row is None:
                    raise
                return to_entity(row), False
            return to_entity(row), True
