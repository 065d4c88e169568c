"""The similar-prompt index: the ready fragments' prompt embeddings as one matrix per base model.

A similar lookup is one matrix-vector product over the embeddings held in memory, not a read
of every fragment's manifest. The matrix is filled from the catalog's ``prompt_embedding``
column once (the cold build), then refreshed incrementally, at most every
``refresh_every_s`` seconds (:data:`REFRESH_EVERY_S` by default: a node doing hundreds of
lookups a second asks the catalog once a second, not hundreds of times), by two queries:

- the ready rows with an id above the last one seen (a primary-key range scan);
- the rows updated since the previous refresh, whatever their status, so a fragment that is
  evicted or marked corrupt stops matching and one rebuilt or validated later starts. The
  window overlaps the previous one by :data:`OVERLAP_S` seconds, so writers whose clocks lag
  this process's by less than that are not missed; rows seen twice are applied twice, which
  changes nothing. On PostgreSQL this scan wants an index on
  ``fragments (base_model_id, updated_at)``; without one it reads the whole table (about
  150 ms at 100,000 fragments), once per ``refresh_every_s``.

The index is a hint, never the authority: :mod:`fragjobs.library` confirms a candidate with
the catalog (its status, that it still exists) before returning it, and drops it from the
index when it is no longer ready. So a stale index never returns a fragment that is not
ready (a deletion, which leaves no row to find, included); the staleness bound only delays,
by at most ``refresh_every_s``, a fragment that became ready since the last refresh.

A ready row whose embedding was never written (made before the column existed, or recorded
by a catalog rebuild) is backfilled from its manifest once, through the callable given to
:meth:`SimilarityIndex.refresh`; the catalog then holds it and it is not read again. A
manifest that cannot be read is skipped for the life of this index (logged once), so a
broken fragment costs one read per process, not one per lookup.

pgvector is not used: the in-memory scan is what is implemented and tested (PostgreSQL and
SQLite); ``python -m fragjobs.bench_catalog`` measures it on 100,000 fragments.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import numpy as np

from fragjobs.catalog.lookup import EmbeddingRow
from fragjobs.errors import FragjobsError
from fragjobs.manifest import ReuseLayer

log = logging.getLogger("fragjobs")

READY = "ready"
OVERLAP_S = 30.0
REFRESH_EVERY_S = 1.0
DEFAULT_THRESHOLD = float(ReuseLayer.model_fields["threshold"].default)
"""The reuse threshold of a row that records none (the manifest's default)."""

Backfill = Callable[[str], tuple[list[float] | None, float | None]]
"""Fragment key → (its prompt embedding or None, its reuse threshold), from its manifest."""


class EmbeddingSource(Protocol):
    """What the index needs of the catalog (:class:`~fragjobs.catalog.Catalog` is one)."""

    def ready_embeddings_since(
        self, base_model_id: int, after_id: int = 0
    ) -> list[EmbeddingRow]: ...

    def embeddings_changed_since(
        self, base_model_id: int, updated_after: datetime
    ) -> list[EmbeddingRow]: ...

    def set_fragment_embedding(
        self, key: str, vector: list[float] | None, threshold: float | None = None
    ) -> None: ...


@dataclass
class _Block:
    """One base model's embeddings: slot ``i`` holds ``keys[i]`` (None: a free slot)."""

    dim: int | None = None
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    keys: list[str | None] = field(default_factory=list)
    slot_of: dict[int, int] = field(default_factory=dict)
    id_of_key: dict[str, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    after_id: int = 0
    updated_after: datetime | None = None
    refreshed: float = 0.0
    unreadable: set[int] = field(default_factory=set)
    to_backfill: dict[int, EmbeddingRow] = field(default_factory=dict)

    def put(self, row_id: int, key: str, vector: np.ndarray, threshold: float) -> None:
        if self.dim is None:
            self.dim = vector.shape[0]
            self.vectors = np.zeros((64, self.dim), np.float32)
            self.thresholds = np.full(64, np.inf, np.float32)
        if vector.shape[0] != self.dim:
            log.debug("fragment %s: embedding of size %d, not %d", key, vector.shape[0], self.dim)
            self.remove(row_id)
            return
        slot = self.slot_of.get(row_id)
        if slot is None:
            slot = self.free.pop() if self.free else self._append_slot()
            self.slot_of[row_id] = slot
            self.id_of_key[key] = row_id
        self.vectors[slot] = vector
        self.thresholds[slot] = threshold
        self.keys[slot] = key

    def put_many(
        self, row_ids: list[int], keys: list[str], vectors: np.ndarray, thresholds: np.ndarray
    ) -> None:
        """Append rows the block does not hold yet, all at once (the cold build's path)."""
        if self.dim is None:
            self.dim = vectors.shape[1]
            self.vectors = np.zeros((0, self.dim), np.float32)
            self.thresholds = np.zeros(0, np.float32)
        start, count = len(self.keys), len(row_ids)
        if start + count > self.vectors.shape[0]:
            self._grow(max(64, 1 << (start + count - 1).bit_length()))
        self.vectors[start : start + count] = vectors
        self.thresholds[start : start + count] = thresholds
        self.keys.extend(keys)
        self.slot_of.update(zip(row_ids, range(start, start + count), strict=True))
        self.id_of_key.update(zip(keys, row_ids, strict=True))

    def _grow(self, capacity: int) -> None:
        more = capacity - self.vectors.shape[0]
        self.vectors = np.concatenate([self.vectors, np.zeros((more, self.dim), np.float32)])
        self.thresholds = np.concatenate([self.thresholds, np.full(more, np.inf, np.float32)])

    def _append_slot(self) -> int:
        slot = len(self.keys)
        if slot == self.vectors.shape[0]:  # grow by doubling: amortised O(1) per fragment
            self._grow(max(64, 2 * slot))
        self.keys.append(None)
        return slot

    def remove(self, row_id: int) -> None:
        slot = self.slot_of.pop(row_id, None)
        if slot is None:
            return
        self.id_of_key.pop(self.keys[slot] or "", None)
        self.vectors[slot] = 0.0
        self.thresholds[slot] = np.inf  # a free slot never matches
        self.keys[slot] = None
        self.free.append(slot)


class SimilarityIndex:
    """The prompt embeddings of one catalog's ready fragments, by base model.

    Args:
        source: the catalog (anything with ``ready_embeddings_since``,
            ``embeddings_changed_since`` and ``set_fragment_embedding``).
        refresh_every_s: the least time between two refreshes of a base model (0: before
            every lookup); the first one, the cold build, always runs.

    Example::

        index = SimilarityIndex(catalog)
        index.refresh(base_id)
        index.candidates(base_id, embedding)  # [(key, cosine), ...], best first
    """

    def __init__(self, source: EmbeddingSource, refresh_every_s: float = REFRESH_EVERY_S) -> None:
        self._source = source
        self.refresh_every_s = refresh_every_s
        self._blocks: dict[int, _Block] = {}
        self._lock = threading.Lock()
        self.cold_build_s: dict[int, float] = {}
        """Seconds the first refresh of each base model took (the cold build)."""

    def size(self, base_model_id: int) -> int:
        """How many fragments of this base the index holds."""
        block = self._blocks.get(base_model_id)
        return len(block.slot_of) if block is not None else 0

    def refresh(self, base_model_id: int, backfill: Backfill | None = None) -> int:
        """Apply the catalog's changes since the last refresh; return how many rows were read.

        Args:
            base_model_id: the base model whose fragments to refresh.
            backfill: reads a fragment's embedding and threshold from its manifest, for ready
                rows whose embedding column was never written; without it they are skipped
                (and tried again on the next refresh that has one).
        """
        with self._lock:
            block = self._blocks.setdefault(base_model_id, _Block())
            started = time.perf_counter()
            cold = block.updated_after is None
            if not cold and started - block.refreshed < self.refresh_every_s:
                return 0
            since = datetime.now(UTC) - timedelta(seconds=OVERLAP_S)
            changed = (
                []
                if block.updated_after is None  # the cold build reads every ready row below
                else self._source.embeddings_changed_since(base_model_id, block.updated_after)
            )
            new = self._source.ready_embeddings_since(base_model_id, block.after_id)
            waiting = list(block.to_backfill.values()) if backfill is not None else []
            latest = {row.id: row for row in waiting + changed + new}  # one read each
            for row in self._put_plain_rows(block, list(latest.values())):
                self._apply(block, row, backfill)
            if new:  # only this scan is complete above the watermark
                block.after_id = max(block.after_id, new[-1].id)
            block.updated_after, block.refreshed = since, started
            if cold:
                self.cold_build_s[base_model_id] = time.perf_counter() - started
            return len(changed) + len(new)

    def _put_plain_rows(self, block: _Block, rows: list[EmbeddingRow]) -> list[EmbeddingRow]:
        """Add the new ready rows with a usable embedding in one go; return the others."""
        dim = block.dim or next((len(r.embedding) // 4 for r in rows if r.embedding), None)
        plain = [
            r
            for r in rows
            if r.status == READY
            and r.embedding
            and len(r.embedding) == 4 * (dim or 0)
            and r.id not in block.slot_of
        ]
        if len(plain) < 2:
            return rows
        vectors = np.frombuffer(b"".join(r.embedding for r in plain), "<f4").reshape(-1, dim)
        norms = np.linalg.norm(vectors, axis=1)
        usable = np.isfinite(norms) & (norms > 0)
        kept = [r for r, ok in zip(plain, usable, strict=True) if ok]
        block.put_many(
            [r.id for r in kept],
            [r.key for r in kept],
            (vectors[usable] / norms[usable, None]).astype(np.float32),
            np.asarray(
                [DEFAULT_THRESHOLD if r.threshold is None else r.threshold for r in kept],
                np.float32,
            ),
        )
        for r in kept:
            block.to_backfill.pop(r.id, None)
        done = {r.id for r in kept}
        return [r for r in rows if r.id not in done]

    def _apply(self, block: _Block, row: EmbeddingRow, backfill: Backfill | None) -> None:
        block.to_backfill.pop(row.id, None)
        if row.status != READY:
            block.remove(row.id)
            return
        embedding, threshold = row.embedding, row.threshold
        if embedding is None:
            if row.id in block.unreadable:
                return
            if backfill is None:  # kept until a refresh that can read manifests
                block.to_backfill[row.id] = row
                return
            try:
                vector, threshold = backfill(row.key)
                self._source.set_fragment_embedding(row.key, vector, threshold)
            except FragjobsError as exc:
                block.unreadable.add(row.id)
                log.warning("fragment %s has no embedding for similar lookups: %s", row.key, exc)
                return
            embedding = b"" if vector is None else np.asarray(vector, "<f4").tobytes()
        if not embedding:
            block.remove(row.id)
            return
        stored = np.frombuffer(embedding, "<f4").astype(np.float32)
        norm = float(np.linalg.norm(stored))
        if not np.isfinite(norm) or norm == 0.0:
            block.remove(row.id)
            return
        block.put(
            row.id, row.key, stored / norm, DEFAULT_THRESHOLD if threshold is None else threshold
        )

    def candidates(
        self, base_model_id: int, embedding: np.ndarray, limit: int = 8
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, cosine)`` at or above their threshold, most similar first.

        ``embedding`` is a 1-D vector (any norm); one of another size than the base's
        embeddings matches nothing.
        """
        query = np.asarray(embedding, np.float32).reshape(-1)
        with self._lock:
            block = self._blocks.get(base_model_id)
            if block is None or block.dim != query.shape[0] or not block.slot_of:
                return []
            norm = float(np.linalg.norm(query))
            if not np.isfinite(norm) or norm == 0.0:
                return []
            used = len(block.keys)
            # einsum, not BLAS: a single-threaded pass beats a multi-threaded gemv that
            # fights the generation's threads for the cores (measured: 8 ms vs 27 ms, 100k).
            sims = np.einsum("ij,j->i", block.vectors[:used], query / norm)
            hits = np.flatnonzero(sims >= block.thresholds[:used])
            if hits.size > limit:
                hits = hits[np.argpartition(-sims[hits], limit - 1)[:limit]]
            hits = hits[np.argsort(-sims[hits], kind="stable")]
            return [(block.keys[i], float(sims[i])) for i in hits]  # type: ignore[misc]

    def drop(self, base_model_id: int, key: str) -> None:
        """Forget fragment ``key`` (the catalog says it is gone or no longer ready)."""
        with self._lock:
            block = self._blocks.get(base_model_id)
            if block is not None and key in block.id_of_key:
                block.remove(block.id_of_key[key])
