"""The lookup queries (fragjobs.catalog.lookup) and the similar-prompt index on top of them,
each on SQLite and on the real PostgreSQL server. No store exists here: every answer comes
from the catalog's columns, none from a manifest."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import update

from fragjobs.catalog import Catalog
from fragjobs.catalog.lookup import REUSE_THRESHOLD_PARAM
from fragjobs.errors import InvalidInputError, NotFoundError
from fragjobs.keys import make_fragment_key, prompt_hash
from fragjobs.library import lookup_prompt, lookup_similar, similarity_index
from fragjobs.library_index import SimilarityIndex
from models import FragmentRow

DIM = 8


@pytest.fixture
def catalog(backend_catalog: Catalog) -> Catalog:
    """A migrated, empty catalog on each backend (``backend_catalog`` in conftest)."""
    return backend_catalog


def unit(*values: float) -> list[float]:
    vector = np.zeros(DIM, np.float32)
    vector[: len(values)] = values
    return (vector / np.linalg.norm(vector)).tolist()


class Library:
    """Fragments made as the chain makes them (profile, row, embedding, ready)."""

    def __init__(self, catalog: Catalog, base_name: str = "shapes") -> None:
        self.catalog = catalog
        self.base = catalog.get_or_create_base_model(
            base_name, prompt_hash(base_name), f"builtin:{base_name}"
        )
        self.count = 0

    def add(
        self,
        prompt: str,
        embedding: list[float] | None = None,
        status: str = "ready",
        threshold: float | None = 0.8,
    ) -> str:
        self.count += 1
        params = {"n": self.count}
        key = make_fragment_key(self.base.name, prompt, params)
        profile = self.catalog.get_or_create_profile(
            f"p{self.count}_{key}", self.base.id, prompt, "1" * 64, {}, "file:///s", "2" * 64, "x"
        )
        self.catalog.create_fragment(
            key, profile.profile_id, self.base.id, prompt, params, "file:///f"
        )
        if embedding is not None:
            self.catalog.set_fragment_embedding(key, embedding, threshold)
        self.catalog.set_fragment_status(key, status)
        return key


# -- queries -------------------------------------------------------------------------------


def test_same_prompt_is_one_query_on_the_hash(catalog: Catalog) -> None:
    lib = Library(catalog)
    other_base = Library(catalog, "tiny-sd")
    old = lib.add("a red circle")
    new = lib.add("A red   circle ")  # the same prompt, normalised
    lib.add("a red circle", status="failed_gate")
    other_base.add("a red circle")
    lib.add("a blue square")

    # Never used: the most recently made wins; then the most recently used.
    assert catalog.latest_ready_for_prompt(lib.base.id, prompt_hash("a red circle")).key == new
    catalog.mark_fragment_used(old)
    found = lookup_prompt(catalog, lib.base.id, "  a RED circle")
    assert found is not None and found.key == old and found.status == "ready"
    catalog.set_fragment_status(old, "evicted")
    catalog.set_fragment_status(new, "corrupt")
    assert lookup_prompt(catalog, lib.base.id, "a red circle") is None
    assert lookup_prompt(catalog, lib.base.id, "a green star") is None
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        lookup_prompt(catalog, lib.base.id, "   ")


def test_embedding_and_threshold_are_kept_in_the_row(catalog: Catalog) -> None:
    lib = Library(catalog)
    key = lib.add("a red circle", unit(1, 2), threshold=0.9)
    no_embedding = lib.add("a blue square")
    catalog.set_fragment_embedding(no_embedding, None)
    never_written = lib.add("a green star")

    rows = {r.key: r for r in catalog.ready_embeddings_since(lib.base.id)}
    assert struct.unpack(f"<{DIM}f", rows[key].embedding) == pytest.approx(unit(1, 2))
    assert rows[key].threshold == 0.9 and rows[key].status == "ready"
    assert catalog.get_fragment(key).params == {"n": 1, REUSE_THRESHOLD_PARAM: 0.9}
    assert rows[no_embedding].embedding == b""  # looked for, none: never backfilled again
    assert rows[never_written].embedding is None  # to backfill from the manifest once

    with pytest.raises(NotFoundError, match="not in the catalog"):
        catalog.set_fragment_embedding("shapes_0123456789abcdef_01234567", unit(1))
    with pytest.raises(InvalidInputError, match="finite"):
        catalog.set_fragment_embedding(key, [float("nan")] * DIM)


def test_new_rows_by_id_and_changed_rows_by_time(catalog: Catalog) -> None:
    lib = Library(catalog)
    first = lib.add("a red circle", unit(1))
    [row] = catalog.ready_embeddings_since(lib.base.id)
    assert catalog.ready_embeddings_since(lib.base.id, row.id) == []
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert catalog.embeddings_changed_since(lib.base.id, later) == []

    with catalog._transaction() as session:  # the changes below happen "later"
        session.execute(update(FragmentRow).values(updated_at=later - timedelta(days=1)))
    catalog.update_fragment(first, status="evicted")
    second = lib.add("a blue square", unit(0, 1))
    building = lib.add("a green star", unit(0, 0, 1), status="building")
    assert [r.key for r in catalog.ready_embeddings_since(lib.base.id, row.id)] == [second]
    changed = catalog.embeddings_changed_since(lib.base.id, later - timedelta(hours=1))
    assert {(r.key, r.status) for r in changed} == {
        (first, "evicted"),
        (second, "ready"),
        (building, "building"),
    }


# -- the similar-prompt index --------------------------------------------------------------


def test_similar_lookup_reads_no_manifest(catalog: Catalog) -> None:
    lib = Library(catalog)
    near = lib.add("a red circle", unit(1, 0.1))
    lib.add("a blue square", unit(0, 1))
    lib.add("a strict one", unit(1, 0.2), threshold=0.9999)

    hit = lookup_similar(catalog, lib.base.id, np.asarray(unit(1, 0.15)) * 3)  # any norm
    assert hit is not None and hit.fragment.key == near and hit.match == "similar"
    assert hit.similarity == pytest.approx(float(np.dot(unit(1, 0.1), unit(1, 0.15))), abs=1e-5)
    assert lookup_similar(catalog, lib.base.id, unit(0, 0, 1)) is None  # below every threshold
    assert lookup_similar(catalog, lib.base.id, [1.0, 0.0]) is None  # another size


def test_refresh_picks_up_new_fragments_and_drops_unready_ones(catalog: Catalog) -> None:
    lib = Library(catalog)
    circle = lib.add("a red circle", unit(1))
    index = similarity_index(catalog)
    index.refresh_every_s = 0  # refresh before every lookup
    assert lookup_similar(catalog, lib.base.id, unit(1)).fragment.key == circle
    assert index.size(lib.base.id) == 1

    square = lib.add("a blue square", unit(0, 1))  # made after the cold build
    assert lookup_similar(catalog, lib.base.id, unit(0, 1)).fragment.key == square

    catalog.set_fragment_status(circle, "evicted")
    assert lookup_similar(catalog, lib.base.id, unit(1)) is None
    assert index.size(lib.base.id) == 1

    catalog.set_fragment_status(circle, "ready")  # rebuilt and validated again
    assert lookup_similar(catalog, lib.base.id, unit(1)).fragment.key == circle

    catalog.set_fragment_status(square, "corrupt")
    catalog.delete_fragment(circle)  # a deletion leaves no row to refresh from
    assert lookup_similar(catalog, lib.base.id, unit(0, 1)) is None
    assert lookup_similar(catalog, lib.base.id, unit(1)) is None
    assert index.size(lib.base.id) == 0


def test_a_stale_index_never_answers_with_an_unready_fragment(catalog: Catalog) -> None:
    lib = Library(catalog)
    circle = lib.add("a red circle", unit(1))
    near = lib.add("a red disc", unit(1, 0.3))
    index = similarity_index(catalog)
    index.refresh_every_s = 3600  # no refresh after the cold build in this test
    assert lookup_similar(catalog, lib.base.id, unit(1)).fragment.key == circle

    catalog.set_fragment_status(circle, "corrupt")
    hit = lookup_similar(catalog, lib.base.id, unit(1))  # confirmed with the catalog
    assert hit is not None and hit.fragment.key == near
    assert index.size(lib.base.id) == 1
    catalog.set_fragment_status(circle, "ready")
    assert lookup_similar(catalog, lib.base.id, unit(1)).fragment.key == near  # not yet seen
    index.refresh_every_s = 0
    assert lookup_similar(catalog, lib.base.id, unit(1)).fragment.key == circle


def test_a_missing_embedding_is_backfilled_once(catalog: Catalog) -> None:
    lib = Library(catalog)
    key = lib.add("a red circle")  # a row from before the column: no embedding
    reads: list[str] = []

    def from_manifest(k: str) -> tuple[list[float] | None, float | None]:
        reads.append(k)
        return unit(1), 0.8

    index = SimilarityIndex(catalog, refresh_every_s=0)
    index.refresh(lib.base.id)  # cannot read manifests: kept for later
    assert index.size(lib.base.id) == 0 and reads == []
    index.refresh(lib.base.id, from_manifest)
    index.refresh(lib.base.id, from_manifest)
    assert reads == [key] and index.candidates(lib.base.id, np.asarray(unit(1)))[0][0] == key

    fresh = SimilarityIndex(catalog)  # another process: the catalog has it now
    fresh.refresh(lib.base.id, from_manifest)
    assert reads == [key] and fresh.size(lib.base.id) == 1


def test_the_cold_build_keeps_only_usable_embeddings(catalog: Catalog) -> None:
    lib = Library(catalog)
    good = [lib.add(f"a shape number {i}", unit(1, i)) for i in range(3)]
    lib.add("another size", [1.0, 0.0, 0.0, 0.0])
    lib.add("all zeros", [0.0] * DIM)
    index = SimilarityIndex(catalog)
    assert index.refresh(lib.base.id) == 5 and index.size(lib.base.id) == 3
    assert [k for k, _ in index.candidates(lib.base.id, np.asarray(unit(1, 2)))][0] == good[2]
    assert index.cold_build_s[lib.base.id] > 0


def test_the_matrix_grows_and_reuses_freed_slots() -> None:
    from fragjobs.library_index import _Block

    block = _Block()
    block.put_many([1, 2], ["a", "b"], np.eye(2, DIM, dtype=np.float32), np.full(2, 0.8))
    for i in range(3, 103):  # one at a time, past the first capacity
        block.put(i, f"k{i}", np.asarray(unit(1, i), np.float32), 0.8)
    assert len(block.slot_of) == 102 and block.vectors.shape[0] >= 102
    block.remove(2)
    block.put(200, "new", np.asarray(unit(0, 1), np.float32), 0.5)
    assert block.slot_of[200] == 1 and block.keys[1] == "new" and len(block.keys) == 102
    block.put_many([300, 301], ["x", "y"], np.eye(2, DIM, dtype=np.float32), np.full(2, 0.8))
    assert block.keys[102:] == ["x", "y"] and block.id_of_key["y"] == 301
