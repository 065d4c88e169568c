"""Tests of fragjobs.catalog, each on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

import fragjobs.catalog as catalog_module
import fragjobs.catalog.fragments as fragments_module
from fragjobs.catalog import (
    BaseModelEntity,
    Catalog,
    ProfileEntity,
    current_revision,
    head_revision,
    mask_url,
    upgrade_database,
)
from fragjobs.config import Settings
from fragjobs.errors import (
    CatalogError,
    InvalidInputError,
    InvalidKeyError,
    NotFoundError,
    SchemaOutOfDateError,
)
from models import FragmentRow, ValidationRow, metadata

KEY = "tiny-sd_0123456789abcdef_01234567"
SHA = "0" * 64


@pytest.fixture
def db_url(backend_db_url: str) -> str:
    """An empty database (no schema) on each backend (``backend_db_url`` in conftest)."""
    return backend_db_url


@pytest.fixture
def catalog(db_url: str) -> Iterator[Catalog]:
    upgrade_database(db_url)
    with Catalog(db_url) as opened:
        yield opened


def seed_profile(catalog: Catalog) -> tuple[BaseModelEntity, ProfileEntity]:
    model = catalog.get_or_create_base_model("tiny-sd", SHA, "builtin:tiny-sd")
    profile = catalog.get_or_create_profile(
        "prof-1", model.id, "a red cube", "1" * 64, {"seeds": [0, 1]}, "file:///s", "2" * 64, "x"
    )
    return model, profile


def seed_fragment(catalog: Catalog, key: str = KEY) -> BaseModelEntity:
    model, profile = seed_profile(catalog)
    catalog.create_fragment(key, profile.profile_id, model.id, "a red cube", {"r": 8}, "file:///f")
    return model


def count_rows(url: str, table: type) -> int:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return session.scalar(select(func.count()).select_from(table))
    finally:
        engine.dispose()


# -- schema --------------------------------------------------------------------------------


def test_upgrade_creates_exactly_the_orm_schema(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert current_revision(db_url) is None
    assert upgrade_database(db_url) == head_revision()
    assert upgrade_database(db_url) == head_revision()  # idempotent
    assert current_revision(db_url) == head_revision()

    engine = create_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == set(metadata.tables) | {"alembic_version"}
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_migrations_run_from_the_url_alone(tmp_path: Path) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    config = catalog_module._alembic_config(url)  # no connection attribute: env.py opens one
    command.upgrade(config, "head")
    assert current_revision(url) == head_revision()

    command.downgrade(config, "base")
    engine = create_engine(url)
    try:
        assert inspect(engine).get_table_names() == ["alembic_version"]
    finally:
        engine.dispose()


def test_database_without_schema_is_refused_with_the_fix(db_url: str) -> None:
    with pytest.raises(SchemaOutOfDateError) as excinfo:
        Catalog(db_url)
    assert "fragjobs db upgrade" in str(excinfo.value)
    assert mask_url(db_url) in str(excinfo.value)

    Catalog(db_url, check_schema=False).dispose()  # opening without the check is allowed


def test_database_from_a_newer_fragjobs_is_refused(catalog: Catalog, db_url: str) -> None:
    with catalog._transaction() as session:
        session.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    with pytest.raises(SchemaOutOfDateError, match="newer fragjobs"):
        Catalog(db_url)
    with pytest.raises(SchemaOutOfDateError, match="from_the_future"):
        upgrade_database(db_url)


def test_password_is_masked() -> None:
    masked = mask_url("postgresql+psycopg://fragjobs:s3cret@db:5432/fragjobs")
    assert "s3cret" not in masked and "***" in masked


def test_unreachable_server_is_a_catalog_error() -> None:
    with pytest.raises(CatalogError, match="unreachable") as excinfo:
        Catalog("postgresql+psycopg://fragjobs:s3cret@127.0.0.1:1/fragjobs")
    assert "s3cret" not in str(excinfo.value)


def test_embedded_default_needs_no_setup(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "new" / "data", database_url=None)

    with pytest.raises(SchemaOutOfDateError, match="fragjobs db upgrade"):
        Catalog.from_settings(settings)
    assert (tmp_path / "new" / "data").is_dir()  # the SQLite folder is created

    with Catalog.open_embedded(settings) as embedded:
        assert embedded.list_fragments() == []
    assert (tmp_path / "new" / "data" / "catalog.db").is_file()
    Catalog.from_settings(settings).dispose()


def test_importing_the_catalog_does_not_import_alembic() -> None:
    code = "import sys, fragjobs.catalog; assert 'alembic' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# -- insert-or-get and concurrency ---------------------------------------------------------


def test_insert_or_get_returns_the_same_row(catalog: Catalog, db_url: str) -> None:
    model, profile = seed_profile(catalog)
    again_model, again_profile = seed_profile(catalog)
    assert (again_model, again_profile) == (model, profile)

    first, created = catalog.create_fragment(KEY, "prof-1", model.id, "p", {}, "file:///f")
    second, created_again = catalog.create_fragment(KEY, "prof-1", model.id, "p", {}, "file:///f")
    assert (created, created_again) == (True, False)
    assert second == first and first.status == "building"

    job, job_created = catalog.create_job("job-1", model.id, "p", [3, 1], KEY)
    same_job, job_created_again = catalog.create_job("job-1", model.id, "p", [3, 1], KEY)
    assert (job_created, job_created_again) == (True, False) and same_job == job
    assert job.fragment_key == KEY and job.seeds == [3, 1] and job.status == "queued"

    assert count_rows(db_url, FragmentRow) == 1


def test_two_threads_creating_the_same_fragment_leave_one_row(
    catalog: Catalog, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, profile = seed_profile(catalog)
    # Both threads look the key up (and miss) before either inserts: the race is certain.
    barrier = threading.Barrier(2, timeout=20)
    state = threading.local()
    find_fragment = fragments_module._find_fragment

    def racing_find(session: Session, key: str) -> FragmentRow | None:
        row = find_fragment(session, key)
        if not getattr(state, "raced", False):
            state.raced = True
            barrier.wait()
        return row

    monkeypatch.setattr(fragments_module, "_find_fragment", racing_find)

    def create(_: int) -> tuple[int, bool]:
        fragment, created = catalog.create_fragment(KEY, "prof-1", model.id, "p", {}, "file:///f")
        return fragment.id, created

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(create, range(2)))

    assert sorted(created for _, created in results) == [False, True]
    assert results[0][0] == results[1][0]
    assert count_rows(db_url, FragmentRow) == 1


def test_increment_job_attempts_counts_atomically(catalog: Catalog) -> None:
    model, _ = seed_profile(catalog)
    catalog.create_job("job-1", model.id, "p", [0], None)

    assert [catalog.increment_job_attempts("job-1") for _ in range(3)] == [1, 2, 3]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda _: catalog.increment_job_attempts("job-1"), range(10)))
    assert catalog.get_job("job-1").attempts == 13
    with pytest.raises(NotFoundError, match="job-2"):
        catalog.increment_job_attempts("job-2")


def test_add_image_is_idempotent_and_listed_by_seed(catalog: Catalog) -> None:
    model, _ = seed_profile(catalog)
    catalog.create_job("job-1", model.id, "p", [7, 2], None)

    first = catalog.add_image("job-1", 7, "file:///g/job-1/7.png", "7" * 64)
    again = catalog.add_image("job-1", 7, "file:///g/job-1/7.png", "7" * 64)
    catalog.add_image("job-1", 2, "file:///g/job-1/2.png", "2" * 64)

    assert again == first and first.job_id == "job-1"
    assert [image.seed for image in catalog.list_images("job-1")] == [2, 7]
    with pytest.raises(NotFoundError, match="job-9"):
        catalog.add_image("job-9", 1, "file:///x.png", "1" * 64)


# -- validation of inputs ------------------------------------------------------------------


@pytest.mark.parametrize("bad_key", ["../escape", "UPPER", "has space", "/abs", "a/b", ""])
def test_invalid_key_is_rejected_and_nothing_is_written(
    catalog: Catalog, db_url: str, bad_key: str
) -> None:
    model, _ = seed_profile(catalog)
    with pytest.raises(InvalidKeyError):
        catalog.create_fragment(bad_key, "prof-1", model.id, "p", {}, "file:///f")
    with pytest.raises(InvalidKeyError):
        catalog.create_job(bad_key, model.id, "p", [1], None)
    with pytest.raises(InvalidKeyError):
        catalog.get_or_create_profile(bad_key, model.id, "p", SHA, {}, "u", SHA, "u")
    assert count_rows(db_url, FragmentRow) == 0
    assert catalog.find_profile("prof-1") is not None


def test_keys_are_checked_before_any_query() -> None:
    # Any query on this catalog would fail to connect; the key check must come first.
    unreachable = Catalog("postgresql+psycopg://postgres@127.0.0.1:1/none", check_schema=False)
    for call in (
        lambda: unreachable.get_fragment("../x"),
        lambda: unreachable.mark_fragment_used("UPPER"),
        lambda: unreachable.increment_job_attempts("a b"),
    ):
        with pytest.raises(InvalidKeyError):
            call()
    with pytest.raises(CatalogError, match="unreachable"):
        unreachable.get_fragment(KEY)


def test_status_check_constraint_rejects_a_bad_status(catalog: Catalog) -> None:
    seed_fragment(catalog)
    with pytest.raises(InvalidInputError, match="bogus"):
        catalog.set_fragment_status(KEY, "bogus")
    with pytest.raises(InvalidInputError, match="bogus"):
        catalog.list_fragments(status="bogus")

    # Bypassing the API, the database's CHECK constraint refuses it too.
    bad_update = text("UPDATE fragments SET status = 'bogus' WHERE key = :k")
    with pytest.raises(CatalogError, match="constraint"), catalog._transaction() as session:
        session.execute(bad_update, {"k": KEY})
    assert catalog.get_fragment(KEY).status == "building"


def test_raw_status_update_violates_the_check_on_the_database(
    catalog: Catalog, db_url: str
) -> None:
    model = seed_fragment(catalog)
    catalog.create_job("job-1", model.id, "p", [1], KEY)
    engine = create_engine(db_url)
    try:
        for statement in (
            "UPDATE fragments SET status = 'bogus'",
            "UPDATE generation_jobs SET status = 'bogus'",
        ):
            with pytest.raises(sa_exc.IntegrityError), engine.begin() as connection:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def test_updates_validate_their_fields(catalog: Catalog) -> None:
    model = seed_fragment(catalog)
    catalog.create_job("job-1", model.id, "p", [1], None)

    with pytest.raises(InvalidInputError, match="storage_uri"):
        catalog.update_fragment(KEY, storage_uri="elsewhere")
    with pytest.raises(InvalidInputError, match="file_sha256"):
        catalog.update_fragment(KEY, file_sha256="not-a-hash")
    with pytest.raises(InvalidInputError, match="size_bytes"):
        catalog.update_fragment(KEY, size_bytes=-1)
    with pytest.raises(InvalidInputError, match="finished_at"):
        catalog.update_job("job-1", finished_at=datetime(2025, 1, 1))
    with pytest.raises(InvalidInputError, match="NaN or Infinity"):
        catalog.add_validation(KEY, {"psnr": float("inf")}, True)
    with pytest.raises(InvalidInputError, match="seeds"):
        catalog.create_job("job-2", model.id, "p", [1, 1], None)
    with pytest.raises(NotFoundError, match="prof-9"):
        catalog.create_fragment("other-key", "prof-9", model.id, "p", {}, "file:///f")
    with pytest.raises(NotFoundError, match="base model id 999"):
        catalog.create_job("job-3", 999, "p", [1], None)


# -- fragments, jobs, lineage --------------------------------------------------------------


def test_fragment_updates_and_usage(catalog: Catalog) -> None:
    seed_fragment(catalog)
    before = catalog.get_fragment(KEY)

    updated = catalog.update_fragment(
        KEY, status="ready", size_bytes=1234, file_sha256="a" * 64, manifest_sha256="b" * 64
    )
    assert (updated.status, updated.size_bytes, updated.file_sha256) == ("ready", 1234, "a" * 64)
    assert updated.updated_at >= before.updated_at
    assert catalog.get_fragment(KEY) == updated

    failed = catalog.set_fragment_status(KEY, "failed_gate", "ssim 0.41 < 0.80")
    assert (failed.status, failed.status_reason) == ("failed_gate", "ssim 0.41 < 0.80")

    assert [catalog.mark_fragment_used(KEY) for _ in range(2)] == [1, 2]
    used = catalog.get_fragment(KEY)
    assert used.hit_count == 2
    assert used.last_used_at is not None and used.last_used_at.tzinfo is not None
    assert abs(used.last_used_at - datetime.now(UTC)) < timedelta(minutes=1)

    with pytest.raises(NotFoundError, match="missing-key"):
        catalog.get_fragment("missing-key")
    assert catalog.find_fragment("missing-key") is None
    with pytest.raises(NotFoundError, match="missing-key"):
        catalog.mark_fragment_used("missing-key")


def test_list_fragments_filters(catalog: Catalog) -> None:
    model, profile = seed_profile(catalog)
    other = catalog.get_or_create_base_model("other", "f" * 64, "local:/models/other")
    for key, base in [("b-key", model), ("a-key", model), ("c-key", other)]:
        catalog.create_fragment(key, profile.profile_id, base.id, "p", {}, f"file:///{key}")
    catalog.set_fragment_status("a-key", "ready")

    assert [f.key for f in catalog.list_fragments()] == ["a-key", "b-key", "c-key"]
    assert [f.key for f in catalog.list_fragments(status="ready")] == ["a-key"]
    assert [f.key for f in catalog.list_fragments(base_model_id=other.id)] == ["c-key"]
    assert catalog.list_fragments(status="building", base_model_id=other.id)[0].key == "c-key"


def test_validations_and_job_updates(catalog: Catalog) -> None:
    model = seed_fragment(catalog)
    assert catalog.latest_validation(KEY) is None
    catalog.add_validation(KEY, {"ssim": 0.7}, False)
    latest = catalog.add_validation(KEY, {"ssim": 0.95, "lpips": None}, True)
    assert catalog.latest_validation(KEY) == latest
    assert latest.metrics == {"ssim": 0.95, "lpips": None} and latest.passed is True

    catalog.create_job("job-1", model.id, "p", [1, 2], KEY)
    finished = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    job = catalog.update_job(
        "job-1",
        status="done",
        used_fallback=True,
        fallback_reason="fragment corrupt",
        fragment_key=None,
        finished_at=finished,
    )
    assert job.fragment_key is None and job.used_fallback is True
    assert job.finished_at == finished and job.finished_at.tzinfo == UTC
    assert catalog.get_job("job-1") == job
    assert catalog.update_job("job-1", fragment_key=KEY).fragment_key == KEY


def test_lineage_follows_the_foreign_keys(catalog: Catalog, db_url: str) -> None:
    model = seed_fragment(catalog)
    first = catalog.add_validation(KEY, {"ssim": 0.9}, True)
    second = catalog.add_validation(KEY, {"ssim": 0.8}, True)
    for job_id in ("job-b", "job-a"):
        catalog.create_job(job_id, model.id, "p", [1, 2], KEY)
        for seed in (1, 2):
            catalog.add_image(job_id, seed, f"file:///g/{job_id}/{seed}.png", "3" * 64)
    catalog.create_job("job-full", model.id, "p", [1], None)
    catalog.add_image("job-full", 1, "file:///g/job-full/1.png", "4" * 64)

    assert catalog.lineage(KEY) == {
        "fragment_key": KEY,
        "status": "building",
        "profile_id": "prof-1",
        "base_model": {"id": model.id, "name": "tiny-sd", "sha256": SHA},
        "validation_ids": [first.id, second.id],
        "job_ids": ["job-a", "job-b"],
        "image_count": 4,
    }

    assert catalog.delete_fragment(KEY) is True
    assert catalog.delete_fragment(KEY) is False
    assert count_rows(db_url, ValidationRow) == 0
    assert catalog.get_job("job-a").fragment_key is None  # the job and its images stay
    assert len(catalog.list_images("job-a")) == 2
    with pytest.raises(NotFoundError):
        catalog.lineage(KEY)


def test_head_revision_read_from_the_files_is_alembics_head() -> None:
    """The head is read without importing alembic; it must be the one alembic computes."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(catalog_module._alembic_config())
    assert catalog_module.head_revision() == script.get_current_head()
