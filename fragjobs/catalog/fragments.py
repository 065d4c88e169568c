"""Fragments in the catalog: their rows, status, usage counts and deletion."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from fragjobs.catalog.bases import _base_model_row
from fragjobs.catalog.checks import (
    _check_fields,
    _check_json_object,
    _check_sha256,
    _check_status,
    _check_text,
)
from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.entities import FragmentEntity, _fragment
from fragjobs.catalog.profiles import _profile_row
from fragjobs.errors import NotFoundError
from fragjobs.keys import check_int, normalise_prompt, validate_key
from fragjobs.keys import prompt_hash as hash_prompt
from models import FRAGMENT_STATUSES, FragmentRow, utcnow


def _find_fragment(session: Session, key: str) -> FragmentRow | None:
    return session.scalars(select(FragmentRow).where(FragmentRow.key == key)).one_or_none()


def _fragment_row(session: Session, key: str) -> FragmentRow:
    row = _find_fragment(session, key)
    if row is None:
        raise NotFoundError(f"fragment {key!r} is not in the catalog")
    return row


class FragmentsMixin(CatalogCore):
    """The fragment methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def create_fragment(
        self,
        key: str,
        profile_id: str,
        base_model_id: int,
        prompt: str,
        params: dict[str, Any],
        storage_uri: str,
    ) -> tuple[FragmentEntity, bool]:
        """Insert fragment ``key`` with status ``building``, or get the existing one.

        Returns:
            ``(fragment, created)``; ``created`` is False when ``key`` already existed (its
            row is returned unchanged).

        Raises:
            InvalidKeyError: ``key`` or ``profile_id`` is not a valid key.
            NotFoundError: the profile or base model is not in the catalog.
        """
        validate_key(key)
        validate_key(profile_id)
        normalise_prompt(prompt)
        _check_json_object(params, "fragment params")
        _check_text(storage_uri, "storage_uri")

        def make(session: Session) -> FragmentRow:
            profile = _profile_row(session, profile_id)
            _base_model_row(session, base_model_id)
            return FragmentRow(
                key=key,
                profile=profile,
                base_model_id=base_model_id,
                prompt=prompt,
                prompt_hash=hash_prompt(prompt),
                params=params,
                status="building",
                storage_uri=storage_uri,
            )

        return self._insert_or_get(lambda s: _find_fragment(s, key), make, _fragment)

    def find_fragment(self, key: str) -> FragmentEntity | None:
        """The fragment ``key``, or None."""
        validate_key(key)
        with self._transaction() as session:
            row = _find_fragment(session, key)
            return _fragment(row) if row is not None else None

    def get_fragment(self, key: str) -> FragmentEntity:
        """The fragment ``key``; raise NotFoundError if there is none."""
        validate_key(key)
        with self._transaction() as session:
            return _fragment(_fragment_row(session, key))

    def update_fragment(self, key: str, **changes: Any) -> FragmentEntity:
        """Set some of ``status``, ``status_reason``, ``size_bytes``, ``file_sha256``,
        ``manifest_sha256`` of fragment ``key``; return the updated fragment.

        Raises:
            InvalidInputError: an unknown field, an invalid status, size or hash.
            NotFoundError: there is no fragment ``key``.
        """
        validate_key(key)
        allowed = {"status", "status_reason", "size_bytes", "file_sha256", "manifest_sha256"}
        _check_fields(changes, allowed, "fragment")
        if "status" in changes:
            _check_status(changes["status"], FRAGMENT_STATUSES, "fragment")
        if changes.get("size_bytes") is not None:
            check_int(changes["size_bytes"], "size_bytes")
        for name in ("file_sha256", "manifest_sha256"):
            if changes.get(name) is not None:
                _check_sha256(changes[name], name)
        with self._transaction() as session:
            row = _fragment_row(session, key)
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            return _fragment(row)

    def set_fragment_status(
        self, key: str, status: str, reason: str | None = None
    ) -> FragmentEntity:
        """Set fragment ``key``'s status and its reason (cleared when ``reason`` is None)."""
        return self.update_fragment(key, status=status, status_reason=reason)

    def mark_fragment_used(self, key: str) -> int:
        """Count one use of fragment ``key`` (atomically) and stamp it; return the new count.

        Raises:
            NotFoundError: there is no fragment ``key``.
        """
        validate_key(key)
        with self._transaction() as session:
            hit_count = session.execute(
                update(FragmentRow)
                .where(FragmentRow.key == key)
                .values(hit_count=FragmentRow.hit_count + 1, last_used_at=utcnow())
                .returning(FragmentRow.hit_count)
            ).scalar_one_or_none()
            if hit_count is None:
                raise NotFoundError(f"fragment {key!r} is not in the catalog")
            return hit_count

    def list_fragments(
        self, status: str | None = None, base_model_id: int | None = None
    ) -> list[FragmentEntity]:
        """Fragments, sorted by key, optionally only those with ``status`` / ``base_model_id``."""
        query = select(FragmentRow).order_by(FragmentRow.key)
        if status is not None:
            _check_status(status, FRAGMENT_STATUSES, "fragment")
            query = query.where(FragmentRow.status == status)
        if base_model_id is not None:
            query = query.where(FragmentRow.base_model_id == base_model_id)
        with self._transaction() as session:
            return [_fragment(row) for row in session.scalars(query)]

    def delete_fragment(self, key: str) -> bool:
        """Delete fragment ``key`` with its validations; return False if it did not exist.

        Jobs that used the fragment are kept; their ``fragment_key`` becomes None.
        """
        validate_key(key)
        with self._transaction() as session:
            # validations cascade and jobs' fragment_id is set to NULL by the foreign keys.
            result = session.execute(delete(FragmentRow).where(FragmentRow.key == key))
            return bool(result.rowcount)
