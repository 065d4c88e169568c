"""The library as a cache, in the catalog: pins, placement, its size and the LRU order.

The shared library's size is the sum of ``size_bytes`` of its ``ready`` fragments placed
``shared``; the least recently used of them (``last_used_at``, else ``created_at``) that
are not pinned are evicted first (:mod:`fragjobs.chain.library_cap` does the evicting).
A prompt's popularity is how many generation jobs asked for it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from fragjobs.catalog.checks import _check_json_object, _check_text
from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.entities import FragmentEntity, _fragment
from fragjobs.catalog.fragments import _fragment_row
from fragjobs.errors import InvalidInputError
from fragjobs.keys import normalise_prompt, validate_key
from models import FRAGMENT_PLACEMENTS, FragmentRow, GenerationJobRow, utcnow

CACHE_PARAM = "cache"
"""The key of a fragment's ``params`` that records why it was placed where it is."""


def _shared_ready():
    return (FragmentRow.status == "ready", FragmentRow.placement == "shared")


class LibraryCacheMixin(CatalogCore):
    """The cache methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def set_pinned(self, key: str, pinned: bool) -> FragmentEntity:
        """Pin fragment ``key`` (never evicted by the size cap) or unpin it.

        Raises:
            NotFoundError: there is no fragment ``key`` (nothing is changed).
        """
        validate_key(key)
        with self._transaction() as session:
            row = _fragment_row(session, key)
            row.pinned = bool(pinned)
            row.updated_at = utcnow()
            return _fragment(row)

    def set_placement(
        self,
        key: str,
        placement: str,
        decision: dict[str, Any] | None = None,
        storage_uri: str | None = None,
    ) -> FragmentEntity:
        """Place fragment ``key`` (``shared`` or ``local``) and record why in its params.

        ``decision`` (the cache score and its terms) is kept as ``params["cache"]``, so
        ``fragjobs fragments show`` says why a fragment is where it is; ``storage_uri`` is
        its folder in the store of that placement.

        Raises:
            InvalidInputError: an unknown placement or a decision that is not a JSON object.
            NotFoundError: there is no fragment ``key``.
        """
        validate_key(key)
        if placement not in FRAGMENT_PLACEMENTS:
            raise InvalidInputError(
                f"invalid placement {placement!r}: use one of {list(FRAGMENT_PLACEMENTS)}"
            )
        if decision is not None:
            _check_json_object(decision, "cache decision")
        if storage_uri is not None:
            _check_text(storage_uri, "storage_uri")
        with self._transaction() as session:
            row = _fragment_row(session, key)
            row.placement = placement
            if decision is not None:
                row.params = {**row.params, CACHE_PARAM: decision}
            if storage_uri is not None:
                row.storage_uri = storage_uri
            row.updated_at = utcnow()
            return _fragment(row)

    def library_bytes(self) -> int:
        """Bytes of the shared library: ``size_bytes`` of its ready shared fragments."""
        query = select(func.coalesce(func.sum(FragmentRow.size_bytes), 0)).where(*_shared_ready())
        with self._transaction() as session:
            return int(session.execute(query).scalar_one())

    def eviction_candidates(self) -> list[FragmentEntity]:
        """Ready, shared, unpinned fragments, least recently used first.

        Recency is ``last_used_at``, or ``created_at`` for a fragment never used; ties go
        to the lower id (the older row).
        """
        recency = func.coalesce(FragmentRow.last_used_at, FragmentRow.created_at)
        query = (
            select(FragmentRow)
            .where(*_shared_ready(), FragmentRow.pinned.is_(False))
            .order_by(recency, FragmentRow.id)
        )
        with self._transaction() as session:
            return [_fragment(row) for row in session.scalars(query)]

    def largest_pinned_bytes(self) -> int:
        """The size of the largest pinned ready shared fragment (0 when none is pinned)."""
        query = select(func.coalesce(func.max(FragmentRow.size_bytes), 0)).where(
            *_shared_ready(), FragmentRow.pinned.is_(True)
        )
        with self._transaction() as session:
            return int(session.execute(query).scalar_one())

    def prompt_job_counts(self, base_model_id: int | None = None) -> dict[str, int]:
        """Generation jobs per normalised prompt (the prompt's popularity).

        Jobs are counted by their own prompt, whether or not they used a fragment, so a
        prompt that only ever ran on the full model counts too.
        """
        query = select(GenerationJobRow.prompt, func.count(GenerationJobRow.id)).group_by(
            GenerationJobRow.prompt
        )
        if base_model_id is not None:
            query = query.where(GenerationJobRow.base_model_id == base_model_id)
        counts: dict[str, int] = {}
        with self._transaction() as session:
            for prompt, n in session.execute(query):
                wanted = normalise_prompt(prompt)
                counts[wanted] = counts.get(wanted, 0) + int(n)
        return counts
