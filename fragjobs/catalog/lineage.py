"""Lineage of a fragment: where it comes from and what used it, across the catalog's tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from fragjobs.catalog.bases import _base_model_row
from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.fragments import _fragment_row
from fragjobs.keys import validate_key
from models import GenerationJobRow, ImageRow, ValidationRow


class LineageMixin(CatalogCore):
    """The lineage method of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def lineage(self, key: str) -> dict[str, Any]:
        """Where fragment ``key`` comes from and what used it, following the foreign keys.

        Returns:
            ``{"fragment_key", "status", "profile_id", "base_model": {"id", "name",
            "sha256"}, "validation_ids", "job_ids", "image_count"}`` (ids sorted).

        Raises:
            NotFoundError: there is no fragment ``key``.
        """
        validate_key(key)
        with self._transaction() as session:
            fragment = _fragment_row(session, key)
            base_model = _base_model_row(session, fragment.base_model_id)
            validation_ids = session.scalars(
                select(ValidationRow.id)
                .where(ValidationRow.fragment_id == fragment.id)
                .order_by(ValidationRow.id)
            ).all()
            job_ids = session.scalars(
                select(GenerationJobRow.job_id)
                .where(GenerationJobRow.fragment_id == fragment.id)
                .order_by(GenerationJobRow.job_id)
            ).all()
            image_count = session.execute(
                select(func.count(ImageRow.id))
                .join(ImageRow.job)
                .where(GenerationJobRow.fragment_id == fragment.id)
            ).scalar_one()
            return {
                "fragment_key": fragment.key,
                "status": fragment.status,
                "profile_id": fragment.profile.profile_id,
                "base_model": {
                    "id": base_model.id,
                    "name": base_model.name,
                    "sha256": base_model.sha256,
                },
                "validation_ids": list(validation_ids),
                "job_ids": list(job_ids),
                "image_count": image_count,
            }
