"""Base models in the catalog: the models that profiles, fragments and jobs are built on."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fragjobs.catalog.checks import _check_sha256, _check_text
from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.entities import BaseModelEntity, _base_model
from fragjobs.errors import NotFoundError
from models import BaseModelRow


def _base_model_row(session: Session, base_model_id: int) -> BaseModelRow:
    row = session.get(BaseModelRow, base_model_id)
    if row is None:
        raise NotFoundError(f"base model id {base_model_id} is not in the catalog")
    return row


class BaseModelsMixin(CatalogCore):
    """The base-model methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def get_or_create_base_model(self, name: str, sha256: str, source: str) -> BaseModelEntity:
        """The base model with ``sha256``, inserted with ``name`` and ``source`` if new."""
        _check_text(name, "base model name")
        _check_sha256(sha256, "base model sha256")
        _check_text(source, "base model source")
        entity, _ = self._insert_or_get(
            lambda s: s.scalars(
                select(BaseModelRow).where(BaseModelRow.sha256 == sha256)
            ).one_or_none(),
            lambda s: BaseModelRow(name=name, sha256=sha256, source=source),
            _base_model,
        )
        return entity

    def get_base_model(self, base_model_id: int) -> BaseModelEntity:
        """The base model with this id.

        Raises:
            NotFoundError: no base model has this id.
        """
        with self._transaction() as session:
            return _base_model(_base_model_row(session, base_model_id))

    def find_base_model(self, sha256: str) -> BaseModelEntity | None:
        """The base model with ``sha256``, or None when the catalog has none."""
        _check_sha256(sha256, "base model sha256")
        with self._transaction() as session:
            row = session.scalars(
                select(BaseModelRow).where(BaseModelRow.sha256 == sha256)
            ).one_or_none()
            return None if row is None else _base_model(row)

    def list_base_models(self) -> list[BaseModelEntity]:
        """Every base model, by name then id."""
        with self._transaction() as session:
            query = select(BaseModelRow).order_by(BaseModelRow.name, BaseModelRow.id)
            return [_base_model(row) for row in session.scalars(query)]

    def set_base_model_source(self, sha256: str, source: str) -> BaseModelEntity:
        """Record where the base model with ``sha256`` is loaded from from now on.

        Raises:
            NotFoundError: no base model has this sha256.
        """
        _check_sha256(sha256, "base model sha256")
        _check_text(source, "base model source")
        with self._transaction() as session:
            row = session.scalars(
                select(BaseModelRow).where(BaseModelRow.sha256 == sha256)
            ).one_or_none()
            if row is None:
                raise NotFoundError(f"base model {sha256} is not in the catalog")
            row.source = source
            session.flush()
            return _base_model(row)
