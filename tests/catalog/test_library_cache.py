"""The catalog's cache methods (pins, placement, library size, LRU order, prompt popularity),
each on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import pytest

from fragjobs.catalog import Catalog
from fragjobs.errors import InvalidInputError, NotFoundError

SHA = "0" * 64


@pytest.fixture
def catalog(backend_catalog: Catalog) -> Catalog:
    """A migrated, empty catalog on each backend (``backend_catalog`` in conftest)."""
    return backend_catalog


def add_ready(catalog: Catalog, key: str, size: int, prompt: str = "a red cube") -> None:
    model = catalog.get_or_create_base_model("tiny-sd", SHA, "builtin:tiny-sd")
    profile = catalog.get_or_create_profile(
        "prof-1", model.id, "a red cube", "1" * 64, {}, "file:///s", "2" * 64, "x"
    )
    catalog.create_fragment(key, profile.profile_id, model.id, prompt, {"r": 8}, "file:///f")
    catalog.update_fragment(key, size_bytes=size, status="ready")


def key(n: int) -> str:
    return f"tiny-sd_{n:016x}_01234567"


def test_library_bytes_count_only_ready_shared_fragments(catalog):
    assert catalog.library_bytes() == 0
    add_ready(catalog, key(1), 100)
    add_ready(catalog, key(2), 30)
    add_ready(catalog, key(3), 7)
    catalog.set_fragment_status(key(3), "failed_gate", "gate")
    add_ready(catalog, key(4), 1000)
    catalog.set_placement(key(4), "local", {"score": -1.0})
    assert catalog.library_bytes() == 130


def test_eviction_candidates_are_least_recently_used_first_and_skip_pinned(catalog):
    for n in (1, 2, 3, 4):
        add_ready(catalog, key(n), 10)
    catalog.mark_fragment_used(key(1))  # used: now the most recent
    catalog.set_pinned(key(2), True)
    catalog.set_fragment_status(key(4), "evicted", "cap")
    order = [row.key for row in catalog.eviction_candidates()]
    assert order == [key(3), key(1)]
    assert catalog.largest_pinned_bytes() == 10
    catalog.set_pinned(key(2), False)
    assert [row.key for row in catalog.eviction_candidates()] == [key(2), key(3), key(1)]
    assert catalog.largest_pinned_bytes() == 0


def test_pinning_an_unknown_key_changes_nothing(catalog):
    add_ready(catalog, key(1), 10)
    with pytest.raises(NotFoundError, match="not in the catalog"):
        catalog.set_pinned(key(9), True)
    assert [row.pinned for row in catalog.list_fragments()] == [False]


def test_placement_records_its_decision_and_refuses_unknown_placements(catalog):
    add_ready(catalog, key(1), 10)
    row = catalog.set_placement(key(1), "local", {"score": -0.5}, "file:///node/f")
    assert (row.placement, row.params["cache"], row.storage_uri) == (
        "local",
        {"score": -0.5},
        "file:///node/f",
    )
    assert row.params["r"] == 8  # the knobs stay
    with pytest.raises(InvalidInputError, match="invalid placement"):
        catalog.set_placement(key(1), "elsewhere")
    assert catalog.get_fragment(key(1)).placement == "local"


def test_prompt_job_counts_group_normalised_prompts(catalog):
    add_ready(catalog, key(1), 10)
    model = catalog.get_or_create_base_model("tiny-sd", SHA, "builtin:tiny-sd")
    catalog.create_job("job-1", model.id, "A red  cube", [0], key(1))
    catalog.create_job("job-2", model.id, "a red cube", [1], None)
    catalog.create_job("job-3", model.id, "a blue cube", [0], None)
    assert catalog.prompt_job_counts(model.id) == {"a red cube": 2, "a blue cube": 1}
    assert catalog.prompt_job_counts(model.id + 1) == {}
