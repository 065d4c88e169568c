"""Validations in the catalog: the quality-gate runs of a fragment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from fragjobs.catalog.checks import _check_json_object
from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.entities import ValidationEntity, _validation
from fragjobs.catalog.fragments import _fragment_row
from fragjobs.errors import InvalidInputError
from fragjobs.keys import validate_key
from models import ValidationRow


class ValidationsMixin(CatalogCore):
    """The validation methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def add_validation(self, key: str, metrics: dict[str, Any], passed: bool) -> ValidationEntity:
        """Record one quality-gate run of fragment ``key``.

        Raises:
            InvalidInputError: ``metrics`` is not a JSON object (NaN/Infinity are refused:
                record a metric that cannot be computed as None) or ``passed`` is not a bool.
            NotFoundError: there is no fragment ``key``.
        """
        validate_key(key)
        _check_json_object(metrics, "validation metrics")
        if not isinstance(passed, bool):
            raise InvalidInputError(f"passed must be a bool, got {passed!r}")
        with self._transaction() as session:
            row = ValidationRow(
                fragment=_fragment_row(session, key), metrics=metrics, passed=passed
            )
            session.add(row)
            session.flush()
            return _validation(row)

    def latest_validation(self, key: str) -> ValidationEntity | None:
        """The most recent validation of fragment ``key``, or None if it has none."""
        validate_key(key)
        with self._transaction() as session:
            fragment = _fragment_row(session, key)
            row = session.scalars(
                select(ValidationRow)
                .where(ValidationRow.fragment_id == fragment.id)
                .order_by(ValidationRow.created_at.desc(), ValidationRow.id.desc())
                .limit(1)
            ).one_or_none()
            return _validation(row) if row is not None else None
