"""Fragment lookups as catalog queries: the same prompt, and the embeddings of similar ones.

The library (:mod:`fragjobs.library`) answers "is there a ready fragment for this prompt?"
with these queries instead of reading manifests: the prompt's hash and its text embedding
are columns of ``fragments`` (``prompt_hash``, ``prompt_embedding``: little-endian float32
bytes), and the similar-prompt reuse threshold is kept in the row's ``params`` under
:data:`REUSE_THRESHOLD_PARAM` when the embedding is written.

An embedding column holding zero bytes means "looked for, the fragment has none": such a row
is never backfilled again and never matches a similar prompt.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from fragjobs.catalog.core import CatalogCore
from fragjobs.catalog.entities import FragmentEntity, _fragment
from fragjobs.errors import InvalidInputError, NotFoundError
from fragjobs.keys import check_int, validate_key
from models import FragmentRow

READY = "ready"
REUSE_THRESHOLD_PARAM = "reuse_threshold"
"""The key of the similar-prompt reuse threshold in a fragment row's ``params``."""


@dataclass(frozen=True)
class EmbeddingRow:
    """One fragment as the similar-prompt index sees it.

    ``embedding`` is float32 little-endian bytes (``b""``: the fragment has none), or None
    when it was never written (a row to backfill from its manifest); ``threshold`` is None
    when the row does not record one.
    """

    id: int
    key: str
    status: str
    embedding: bytes | None
    threshold: float | None


class LookupMixin(CatalogCore):
    """The lookup methods of :class:`~fragjobs.catalog.catalog.Catalog`."""

    def latest_ready_for_prompt(
        self, base_model_id: int, prompt_hash: str
    ) -> FragmentEntity | None:
        """The most recently used (else made) ready fragment for this prompt hash on this base.

        One query on the index ``(base_model_id, status, prompt_hash)``; ties go to the one
        used most often.
        """
        check_int(base_model_id, "base_model_id")
        query = (
            select(FragmentRow)
            .where(
                FragmentRow.base_model_id == base_model_id,
                FragmentRow.status == READY,
                FragmentRow.prompt_hash == prompt_hash,
            )
            .order_by(
                func.coalesce(FragmentRow.last_used_at, FragmentRow.created_at).desc(),
                FragmentRow.hit_count.desc(),
                FragmentRow.id.desc(),
            )
            .limit(1)
        )
        with self._transaction() as session:
            row = session.scalars(query).first()
            return _fragment(row) if row is not None else None

    def set_fragment_embedding(
        self, key: str, vector: list[float] | None, threshold: float | None = None
    ) -> None:
        """Record fragment ``key``'s prompt embedding (float32) and its reuse threshold.

        ``vector=None`` records that the fragment has no embedding (it then never matches a
        similar prompt and is not backfilled again). ``updated_at`` is left alone: the
        similar-prompt index finds a new embedding by the fragment's id or its next status
        change (it is written before the fragment is validated, or by the index itself).

        Raises:
            InvalidInputError: the vector is empty or not finite, or the threshold is not a
                number.
            NotFoundError: there is no fragment ``key``.
        """
        validate_key(key)
        data = b""
        if vector is not None:
            data = _float32_bytes(vector)
        if threshold is not None and (
            not isinstance(threshold, int | float) or not math.isfinite(threshold)
        ):
            raise InvalidInputError(f"reuse threshold must be a finite number, got {threshold!r}")
        with self._transaction() as session:
            row = session.scalars(select(FragmentRow).where(FragmentRow.key == key)).one_or_none()
            if row is None:
                raise NotFoundError(f"fragment {key!r} is not in the catalog")
            values: dict[str, Any] = {"prompt_embedding": data}
            if threshold is not None:
                values["params"] = {**row.params, REUSE_THRESHOLD_PARAM: float(threshold)}
            session.execute(update(FragmentRow).where(FragmentRow.id == row.id).values(values))

    def ready_embeddings_since(self, base_model_id: int, after_id: int = 0) -> list[EmbeddingRow]:
        """The ready fragments of this base with an id above ``after_id``, by id.

        ``after_id=0`` gives every ready fragment (the similar-prompt index's cold build);
        a range scan of the primary key otherwise.
        """
        check_int(after_id, "after_id")
        return self._embedding_rows(
            base_model_id, (FragmentRow.id > after_id) & (FragmentRow.status == READY)
        )

    def embeddings_changed_since(
        self, base_model_id: int, updated_after: datetime
    ) -> list[EmbeddingRow]:
        """The fragments of this base updated after ``updated_after``, whatever their status.

        What the similar-prompt index needs to see a fragment stop (or start again) being
        ready: evicted, marked corrupt, rebuilt, validated.
        """
        return self._embedding_rows(base_model_id, FragmentRow.updated_at > updated_after)

    def _embedding_rows(self, base_model_id: int, condition: Any) -> list[EmbeddingRow]:
        check_int(base_model_id, "base_model_id")
        query = (
            select(
                FragmentRow.id,
                FragmentRow.key,
                FragmentRow.status,
                FragmentRow.prompt_embedding,
                # the threshold alone, not the whole params (3x faster at 100,000 rows)
                FragmentRow.params[REUSE_THRESHOLD_PARAM].as_float(),
            )
            .where(FragmentRow.base_model_id == base_model_id, condition)
            .order_by(FragmentRow.id)
        )
        with self._transaction() as session:
            return [EmbeddingRow(*row) for row in session.execute(query)]


def _float32_bytes(vector: list[float]) -> bytes:
    """``vector`` as little-endian float32 bytes; refuse an empty or non-finite one."""
    values = [float(v) for v in vector]
    if not values or not all(math.isfinite(v) for v in values):
        raise InvalidInputError("a prompt embedding must be a non-empty list of finite numbers")
    return struct.pack(f"<{len(values)}f", *values)
