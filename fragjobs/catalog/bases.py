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
