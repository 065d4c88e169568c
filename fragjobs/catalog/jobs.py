"""Generation jobs in the catalog, with their attempts and the images they produced."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fragjobs.catalog.bases import _base_model_row
from fragjobs.catalog.checks import (
    _check_aware,
    _check_fields,
    _check_json_object,
    _check_sha256,
    _check_status,
    _check_text,
)
from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.entities import ImageEntity, JobEntity, _image, _job
from fragjobs.catalog.fragments import _fragment_row
from fragjobs.errors import InvalidInputError, NotFoundError
from fragjobs.keys import check_int, check_seeds, normalise_prompt, validate_key
from models import JOB_STATUSES, GenerationJobRow, ImageRow


def _find_job(session: Session, job_id: str) -> GenerationJobRow | None:
    query = select(GenerationJobRow).where(GenerationJobRow.job_id == job_id)
    return session.scalars(query).one_or_none()


def _job_row(session: Session, job_id: str) -> GenerationJobRow:
    row = _find_job(session, job_id)
    if row is None:
        raise NotFoundError(f"generation job {job_id!r} is not in the catalog")
    return row


class JobsMixin(CatalogCore):
    """The generation-job and image methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def create_job(
        self,
        job_id: str,
        base_model_id: int,
        prompt: str,
        seeds: list[int],
        fragment_key: str | None,
    ) -> tuple[JobEntity, bool]:
        """Insert job ``job_id`` (status ``queued``), or get the existing one.

        Returns:
            ``(job, created)``; ``created`` is False when ``job_id`` already existed.

        Raises:
            InvalidKeyError: ``job_id`` or ``fragment_key`` is not a valid key.
            InvalidInputError: ``seeds`` are not distinct non-negative integers.
            NotFoundError: the base model or the fragment is not in the catalog.
        """
        validate_key(job_id)
        normalise_prompt(prompt)
        seeds = check_seeds(seeds)
        if fragment_key is not None:
            validate_key(fragment_key)

        def make(session: Session) -> GenerationJobRow:
            _base_model_row(session, base_model_id)
            fragment = _fragment_row(session, fragment_key) if fragment_key is not None else None
            return GenerationJobRow(
                job_id=job_id,
                base_model_id=base_model_id,
                fragment=fragment,
                prompt=prompt,
                seeds=seeds,
                status="queued",
            )

        return self._insert_or_get(lambda s: _find_job(s, job_id), make, _job)

    def get_job(self, job_id: str) -> JobEntity:
        """The job ``job_id``; raise NotFoundError if there is none."""
        validate_key(job_id)
        with self._transaction() as session:
            return _job(_job_row(session, job_id))

    def update_job(self, job_id: str, **changes: Any) -> JobEntity:
        """Set some of ``status``, ``used_fallback``, ``fallback_reason``, ``fragment_key``,
        ``finished_at`` (timezone-aware), ``metrics`` (a JSON object or None) of job
        ``job_id``; return the updated job.

        Raises:
            InvalidInputError: an unknown field or an invalid value.
            NotFoundError: there is no job ``job_id`` (or no fragment ``fragment_key``).
        """
        validate_key(job_id)
        allowed = {
            "status",
            "used_fallback",
            "fallback_reason",
            "fragment_key",
            "finished_at",
            "metrics",
        }
        _check_fields(changes, allowed, "job")
        if changes.get("metrics") is not None:
            _check_json_object(changes["metrics"], "job metrics")
        if "status" in changes:
            _check_status(changes["status"], JOB_STATUSES, "job")
        if "used_fallback" in changes and not isinstance(changes["used_fallback"], bool):
            raise InvalidInputError(f"used_fallback must be a bool, got {changes['used_fallback']}")
        if changes.get("finished_at") is not None:
            _check_aware(changes["finished_at"], "finished_at")
            changes["finished_at"] = changes["finished_at"].astimezone(UTC)
        sets_fragment = "fragment_key" in changes
        fragment_key = changes.pop("fragment_key", None)
        if fragment_key is not None:
            validate_key(fragment_key)
        with self._transaction() as session:
            row = _job_row(session, job_id)
            if sets_fragment:
                row.fragment = _fragment_row(session, fragment_key) if fragment_key else None
            for name, value in changes.items():
                setattr(row, name, value)
            return _job(row)

    def increment_job_attempts(self, job_id: str) -> int:
        """Count one more attempt of job ``job_id`` atomically; return the new count.

        A task calls this first and gives up once the count passes its limit, so a task that
        kills its worker is not redelivered forever.

        Raises:
            NotFoundError: there is no job ``job_id``.
        """
        validate_key(job_id)
        with self._transaction() as session:
            attempts = session.execute(
                update(GenerationJobRow)
                .where(GenerationJobRow.job_id == job_id)
                .values(attempts=GenerationJobRow.attempts + 1)
                .returning(GenerationJobRow.attempts)
            ).scalar_one_or_none()
            if attempts is None:
                raise NotFoundError(f"generation job {job_id!r} is not in the catalog")
            return attempts

    def add_image(self, job_id: str, seed: int, uri: str, sha256: str) -> ImageEntity:
        """Record the image of ``seed`` in job ``job_id``, or get the one already recorded.

        Raises:
            NotFoundError: there is no job ``job_id``.
        """
        validate_key(job_id)
        check_int(seed, "seed", maximum=2**63 - 1)
        _check_text(uri, "image uri")
        _check_sha256(sha256, "image sha256")

        def find(session: Session) -> ImageRow | None:
            query = (
                select(ImageRow)
                .join(ImageRow.job)
                .where(GenerationJobRow.job_id == job_id, ImageRow.seed == seed)
            )
            return session.scalars(query).one_or_none()

        def make(session: Session) -> ImageRow:
            return ImageRow(job=_job_row(session, job_id), seed=seed, uri=uri, sha256=sha256)

        entity, _ = self._insert_or_get(find, make, _image)
        return entity

    def list_images(self, job_id: str) -> list[ImageEntity]:
        """The images of job ``job_id``, sorted by seed; raise NotFoundError if no such job."""
        validate_key(job_id)
        with self._transaction() as session:
            job = _job_row(session, job_id)
            query = select(ImageRow).where(ImageRow.job_id == job.id).order_by(ImageRow.seed)
            return [_image(row) for row in session.scalars(query)]
