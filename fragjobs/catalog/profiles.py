"""Profiles in the catalog: a base model's profiling statistics on one prompt."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fragjobs.catalog.bases import _base_model_row
from fragjobs.catalog.checks import _check_json_object, _check_sha256, _check_text
from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.entities import ProfileEntity, _profile
from fragjobs.errors import NotFoundError
from fragjobs.keys import normalise_prompt, validate_key
from models import ProfileRow


def _find_profile(session: Session, profile_id: str) -> ProfileRow | None:
    query = select(ProfileRow).where(ProfileRow.profile_id == profile_id)
    return session.scalars(query).one_or_none()


def _profile_row(session: Session, profile_id: str) -> ProfileRow:
    row = _find_profile(session, profile_id)
    if row is None:
        raise NotFoundError(f"profile {profile_id!r} is not in the catalog")
    return row


class ProfilesMixin(CatalogCore):
    """The profile methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def get_or_create_profile(
        self,
        profile_id: str,
        base_model_id: int,
        prompt: str,
        prompt_hash: str,
        params: dict[str, Any],
        stats_uri: str,
        stats_sha256: str,
        importance_uri: str,
    ) -> ProfileEntity:
        """The profile ``profile_id``, inserted with these values if new.

        Raises:
            InvalidKeyError: ``profile_id`` is not a valid key.
            NotFoundError: ``base_model_id`` is not in the catalog.
        """
        validate_key(profile_id)
        normalise_prompt(prompt)
        _check_sha256(prompt_hash, "prompt_hash")
        _check_json_object(params, "profile params")
        _check_text(stats_uri, "stats_uri")
        _check_sha256(stats_sha256, "stats_sha256")
        _check_text(importance_uri, "importance_uri")

        def make(session: Session) -> ProfileRow:
            _base_model_row(session, base_model_id)
            return ProfileRow(
                profile_id=profile_id,
                base_model_id=base_model_id,
                prompt=prompt,
                prompt_hash=prompt_hash,
                params=params,
                stats_uri=stats_uri,
                stats_sha256=stats_sha256,
                importance_uri=importance_uri,
            )

        entity, _ = self._insert_or_get(lambda s: _find_profile(s, profile_id), make, _profile)
        return entity

    def find_profile(self, profile_id: str) -> ProfileEntity | None:
        """The profile ``profile_id``, or None."""
        validate_key(profile_id)
        with self._transaction() as session:
            row = _find_profile(session, profile_id)
            return _profile(row) if row is not None else None

    def get_profile(self, profile_id: str) -> ProfileEntity:
        """The profile ``profile_id``; raise NotFoundError if there is none."""
        validate_key(profile_id)
        with self._transaction() as session:
            return _profile(_profile_row(session, profile_id))

    def replace_profile_stats(
        self, profile_id: str, stats_uri: str, stats_sha256: str, importance_uri: str
    ) -> ProfileEntity:
        """Point profile ``profile_id`` at newly stored statistics (a repaired profile).

        Raises:
            NotFoundError: no such profile.
        """
        validate_key(profile_id)
        _check_text(stats_uri, "stats_uri")
        _check_sha256(stats_sha256, "stats_sha256")
        _check_text(importance_uri, "importance_uri")
        with self._transaction() as session:
            row = _profile_row(session, profile_id)
            row.stats_uri, row.stats_sha256 = stats_uri, stats_sha256
            row.importance_uri = importance_uri
            session.flush()
            return _profile(row)
