"""The catalog API: base models, profiles, fragments, validations, jobs and images (DESIGN §4).

The catalog is a SQL database (SQLite file for the embedded default, PostgreSQL for the farm)
whose tables are declared in :mod:`models` and created by alembic (``migrations/``). ORM rows
never leave this module: every method returns a frozen dataclass of plain values.

Every write is idempotent: ``get_or_create_*``, ``create_*`` and ``add_image`` insert a row or
return the one that is already there, so a task retried after a crash continues with its row
instead of inserting a second one. Two concurrent callers are safe too: the loser of the race
hits a unique constraint, rolls back and reads the winner's row.

Example::

    upgrade_database("sqlite:////tmp/catalog.db")
    with Catalog("sqlite:////tmp/catalog.db") as catalog:
        model = catalog.get_or_create_base_model("tiny-sd", sha, "builtin:tiny-sd")
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations
from fragjobs.config import Settings, get_settings
from fragjobs.errors import CatalogError, InvalidInputError, NotFoundError, SchemaOutOfDateError
from fragjobs.keys import check_int, check_seeds, normalise_prompt, validate_key
from models import (
    FRAGMENT_STATUSES,
    JOB_STATUSES,
    Base,
    BaseModelRow,
    FragmentRow,
    GenerationJobRow,
    ImageRow,
    ProfileRow,
    ValidationRow,
    utcnow,
)

if TYPE_CHECKING:
    from alembic.config import Config

UPGRADE_COMMAND = "fragjobs db upgrade"
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


# -- entities ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelEntity:
    """A base model: ``id`` is what profiles, fragments and jobs refer to."""

    id: int
    name: str
    sha256: str
    source: str
    created_at: datetime


@dataclass(frozen=True)
class ProfileEntity:
    """Profiling statistics of one base model on one prompt, and where they are stored."""

    id: int
    profile_id: str
    base_model_id: int
    prompt: str
    prompt_hash: str
    params: dict[str, Any]
    stats_uri: str
    stats_sha256: str
    importance_uri: str
    created_at: datetime


@dataclass(frozen=True)
class FragmentEntity:
    """A fragment; ``profile_id`` is the profile's public id, ``storage_uri`` its folder."""

    id: int
    key: str
    profile_id: str
    base_model_id: int
    prompt: str
    params: dict[str, Any]
    status: str
    status_reason: str | None
    size_bytes: int | None
    file_sha256: str | None
    manifest_sha256: str | None
    storage_uri: str
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None
    hit_count: int


@dataclass(frozen=True)
class ValidationEntity:
    """One quality-gate run of the fragment ``fragment_key``."""

    id: int
    fragment_key: str
    metrics: dict[str, Any]
    passed: bool
    created_at: datetime


@dataclass(frozen=True)
class JobEntity:
    """A generation job; ``fragment_key`` is None when it runs on the full model."""

    id: int
    job_id: str
    base_model_id: int
    fragment_key: str | None
    prompt: str
    seeds: list[int]
    status: str
    attempts: int
    used_fallback: bool
    fallback_reason: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class ImageEntity:
    """One generated image of the job ``job_id``."""

    id: int
    job_id: str
    seed: int
    uri: str
    sha256: str
    created_at: datetime


E = TypeVar("E")
R = TypeVar("R", bound=Base)


def _entity(cls: type[E], row: Base, **overrides: Any) -> E:
    """Build ``cls`` from the same-named attributes of ``row``, except ``overrides``."""
    names = [f.name for f in fields(cls) if f.name not in overrides]
    return cls(**{name: getattr(row, name) for name in names}, **overrides)


def _base_model(row: BaseModelRow) -> BaseModelEntity:
    return _entity(BaseModelEntity, row)


def _profile(row: ProfileRow) -> ProfileEntity:
    return _entity(ProfileEntity, row)


def _fragment(row: FragmentRow) -> FragmentEntity:
    return _entity(FragmentEntity, row, profile_id=row.profile.profile_id)


def _validation(row: ValidationRow) -> ValidationEntity:
    return _entity(ValidationEntity, row, fragment_key=row.fragment.key)


def _job(row: GenerationJobRow) -> JobEntity:
    fragment_key = row.fragment.key if row.fragment is not None else None
    return _entity(JobEntity, row, fragment_key=fragment_key, seeds=list(row.seeds))


def _image(row: ImageRow) -> ImageEntity:
    return _entity(ImageEntity, row, job_id=row.job.job_id)


# -- input checks (before any query) -------------------------------------------------------


def _check_sha256(value: Any, what: str) -> None:
    if not isinstance(value, str) or not _SHA256_PATTERN.match(value):
        raise InvalidInputError(f"{what} must be a lower-case hex sha256 (64 chars), got {value!r}")


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{what} must be a non-empty string, got {value!r}")


def _check_json_object(value: Any, what: str) -> None:
    """A dict that is strict JSON: PostgreSQL's json type refuses NaN and Infinity."""
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"{what} is not strict JSON ({exc}): only str/int/float/bool/None/list/dict, and "
            "no NaN or Infinity; record a value that cannot be computed as None"
        ) from exc


def _check_status(status: Any, allowed: tuple[str, ...], what: str) -> None:
    if status not in allowed:
        raise InvalidInputError(f"invalid {what} status {status!r}: use one of {list(allowed)}")


def _check_aware(value: Any, what: str) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInputError(f"{what} must be a timezone-aware datetime or None")


def _check_fields(given: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise InvalidInputError(f"cannot update {what} field(s) {unknown}: use {sorted(allowed)}")


# -- engines, errors, alembic --------------------------------------------------------------


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except sa_exc.ArgumentError as exc:
        raise CatalogError(
            "invalid catalog database URL: use a SQLAlchemy URL such as "
            "sqlite:////abs/catalog.db or postgresql+psycopg://user@host/db"
        ) from exc


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    return _parse_url(url).render_as_string(hide_password=True)


def _describe(exc: sa_exc.SQLAlchemyError, url: str) -> str:
    detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
    if isinstance(exc, sa_exc.IntegrityError):
        return f"catalog constraint violated: {detail}"
    if isinstance(exc, sa_exc.OperationalError):
        return f"catalog database {mask_url(url)} failed or is unreachable: {detail}"
    return f"catalog database error on {mask_url(url)}: {detail}"


@contextmanager
def _catalog_errors(url: str) -> Iterator[None]:
    """Turn SQLAlchemy errors raised inside the block into CatalogError."""
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        raise CatalogError(_describe(exc, url)) from exc


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    # SQLite ignores foreign keys (and ON DELETE) unless asked, per connection.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _create_engine(url: str) -> Engine:
    """An engine for ``url``; for a SQLite file, its folder is created first."""
    parsed = _parse_url(url)
    try:
        if parsed.get_backend_name() != "sqlite":
            return create_engine(parsed, pool_pre_ping=True)
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # A writer waits for another one instead of failing at once with "database is locked".
        engine = create_engine(parsed, connect_args={"timeout": 30})
    except (ImportError, sa_exc.ArgumentError) as exc:
        raise CatalogError(
            f"cannot open catalog {mask_url(url)} ({exc}); for PostgreSQL install the "
            "driver with pip install 'fragjobs[farm]'"
        ) from exc
    except OSError as exc:
        raise CatalogError(f"cannot create the folder of catalog {mask_url(url)}: {exc}") from exc
    event.listen(engine, "connect", _enable_sqlite_foreign_keys)
    return engine


def _alembic_config(url: str | None = None) -> Config:
    """An alembic Config built in code: the packaged migrations, and ``url`` if given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if url is not None:
        # ConfigParser interpolation treats "%" as special (URL-encoded passwords have it).
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _revision_of(engine: Engine, url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with _catalog_errors(url), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    return {revision.revision for revision in script.walk_revisions()}


def _schema_error(url: str, current: str | None) -> SchemaOutOfDateError:
    masked, head = mask_url(url), head_revision()
    if current is not None and current not in _known_revisions():
        return SchemaOutOfDateError(
            f"catalog {masked} is at schema revision {current!r}, which this fragjobs does not "
            f"know (it expects {head!r}): the database was upgraded by a newer fragjobs; "
            "install that version"
        )
    state = "has no fragjobs schema" if current is None else f"is at schema revision {current!r}"
    return SchemaOutOfDateError(
        f"catalog {masked} {state}, this fragjobs needs revision {head!r}: "
        f"run `{UPGRADE_COMMAND}` (it migrates the database named by FRAGJOBS_DATABASE_URL)"
    )


def head_revision() -> str:
    """The schema revision this code expects (the alembic head of ``migrations/``)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise CatalogError("the packaged migrations have no revision: reinstall fragjobs")
    return head


def current_revision(url: str) -> str | None:
    """The schema revision of the database at ``url``; None when it has no schema yet.

    Raises:
        CatalogError: the database cannot be reached.
    """
    engine = _create_engine(url)
    try:
        return _revision_of(engine, url)
    finally:
        engine.dispose()


def upgrade_database(url: str) -> str:
    """Create or migrate the catalog schema at ``url`` to the head revision; return it.

    This is what ``fragjobs db upgrade`` runs. Running it on an up-to-date database does
    nothing.

    Raises:
        SchemaOutOfDateError: the database has a revision this code does not know.
        CatalogError: the database cannot be reached or the migration failed.
    """
    from alembic import command
    from alembic.util import CommandError

    config = _alembic_config(url)
    engine = _create_engine(url)
    try:
        with _catalog_errors(url), engine.begin() as connection:
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, "head")
            except CommandError as exc:
                raise _schema_error(url, _revision_of(engine, url)) from exc
        revision = _revision_of(engine, url)
    finally:
        engine.dispose()
    if revision is None:
        raise CatalogError(f"upgrading catalog {mask_url(url)} left it without a revision")
    return revision


def _is_sqlite(url: str) -> bool:
    return _parse_url(url).get_backend_name() == "sqlite"


# -- row lookups inside a session -----------------------------------------------------------


def _find_fragment(session: Session, key: str) -> FragmentRow | None:
    return session.scalars(select(FragmentRow).where(FragmentRow.key == key)).one_or_none()


def _fragment_row(session: Session, key: str) -> FragmentRow:
    row = _find_fragment(session, key)
    if row is None:
        raise NotFoundError(f"fragment {key!r} is not in the catalog")
    return row


def _find_profile(session: Session, profile_id: str) -> ProfileRow | None:
    query = select(ProfileRow).where(ProfileRow.profile_id == profile_id)
    return session.scalars(query).one_or_none()


def _profile_row(session: Session, profile_id: str) -> ProfileRow:
    row = _find_profile(session, profile_id)
    if row is None:
        raise NotFoundError(f"profile {profile_id!r} is not in the catalog")
    return row


def _find_job(session: Session, job_id: str) -> GenerationJobRow | None:
    query = select(GenerationJobRow).where(GenerationJobRow.job_id == job_id)
    return session.scalars(query).one_or_none()


def _job_row(session: Session, job_id: str) -> GenerationJobRow:
    row = _find_job(session, job_id)
    if row is None:
        raise NotFoundError(f"generation job {job_id!r} is not in the catalog")
    return row


def _base_model_row(session: Session, base_model_id: int) -> BaseModelRow:
    row = session.get(BaseModelRow, base_model_id)
    if row is None:
        raise NotFoundError(f"base model id {base_model_id} is not in the catalog")
    return row


# -- the catalog ---------------------------------------------------------------------------


class Catalog:
    """The catalog database at a SQLAlchemy URL.

    Args:
        url: ``sqlite:////abs/catalog.db`` or ``postgresql+psycopg://user:pw@host/db``.
        check_schema: refuse a database whose schema is missing or not at this code's
            revision.

    Raises:
        SchemaOutOfDateError: the schema is missing or out of date; the message gives the
            command that fixes it (``fragjobs db upgrade``).
        CatalogError: the database cannot be reached.
    """

    def __init__(self, url: str, *, check_schema: bool = True) -> None:
        self.url = url
        self._engine = _create_engine(url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        if check_schema:
            try:
                current = _revision_of(self._engine, url)
                if current != head_revision():
                    raise _schema_error(url, current)
            except BaseException:
                self._engine.dispose()
                raise

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Catalog:
        """The catalog at ``settings.resolved_database_url`` (schema checked, not migrated)."""
        return cls((settings or get_settings()).resolved_database_url)

    @classmethod
    def open_embedded(cls, settings: Settings | None = None) -> Catalog:
        """The catalog of the settings, migrated first when it is the embedded SQLite file.

        The embedded default needs no setup step: its schema is created or upgraded here. A
        server database (the farm's PostgreSQL) is never migrated implicitly; it is only
        checked, as in :meth:`from_settings`.
        """
        url = (settings or get_settings()).resolved_database_url
        if _is_sqlite(url):
            upgrade_database(url)
        return cls(url)

    def __repr__(self) -> str:
        return f"Catalog({mask_url(self.url)!r})"

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    def dispose(self) -> None:
        """Close every pooled connection (the catalog can still be used afterwards)."""
        self._engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error, errors → CatalogError."""
        # Closing the session rolls back whatever was not committed.
        with _catalog_errors(self.url), self._sessions() as session:
            yield session
            session.commit()

    def _insert_or_get(
        self,
        find: Callable[[Session], R | None],
        make: Callable[[Session], R],
        to_entity: Callable[[R], E],
    ) -> tuple[E, bool]:
        """Return ``(entity, True)`` for a new row, ``(entity, False)`` for an existing one."""
        with self._transaction() as session:
            row = find(session)
            if row is not None:
                return to_entity(row), False
            row = make(session)
            session.add(row)
            try:
                session.flush()
            except sa_exc.IntegrityError:
                # A concurrent caller inserted the same unique key after our read.
                session.rollback()
                row = find(session)
                if row is None:
                    raise
                return to_entity(row), False
            return to_entity(row), True

    # -- base models and profiles --------------------------------------------------------

    def get_or_create_base_model(self, name: str, sha256: str, source: str) -> BaseModelEntity:
        """The base model with ``sha256``, inserted with ``name`` and ``source`` if new."""
        _check_text(name, "base model name")
        _check_sha256(sha256, "base model sha256")
        _check_text(source, "base model source")
        entity, _ = self._insert_or_get(
            lambda s: s.scalars(
                select(BaseModelRow).where(BaseModelRow.sha256 == sha256)
            ).one_or_none(),
            lambda s: BaseModelRow(name=name, sha256=sha256, source=source),
            _base_model,
        )
        return entity

    def get_base_model(self, base_model_id: int) -> BaseModelEntity:
        """The base model with this id.

        Raises:
            NotFoundError: no base model has this id.
        """
        with self._transaction() as session:
            return _base_model(_base_model_row(session, base_model_id))

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

    # -- fragments -------------------------------------------------------------------------

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

    # -- validations -----------------------------------------------------------------------

    def add_validation(self, key: str, metrics: dict[str, Any], passed: bool) -> ValidationEntity:
        """Record one quality-gate run of fragment ``key``.

        Raises:
            InvalidInputError: ``metrics`` is not a JSON object (NaN/Infinity are refused:
                record a metric that cannot be computed as None) or ``passed`` is not a bool.
            NotFoundError: there is no fragment ``key``.
        """
        validate_key(key)
        _check_json_object(metrics, "validation metrics")
        if not isinstance(passed, bool):
            raise InvalidInputError(f"passed must be a bool, got {passed!r}")
        with self._transaction() as session:
            row = ValidationRow(
                fragment=_fragment_row(session, key), metrics=metrics, passed=passed
            )
            session.add(row)
            session.flush()
            return _validation(row)

    def latest_validation(self, key: str) -> ValidationEntity | None:
        """The most recent validation of fragment ``key``, or None if it has none."""
        validate_key(key)
        with self._transaction() as session:
            fragment = _fragment_row(session, key)
            row = session.scalars(
                select(ValidationRow)
                .where(ValidationRow.fragment_id == fragment.id)
                .order_by(ValidationRow.created_at.desc(), ValidationRow.id.desc())
                .limit(1)
            ).one_or_none()
            return _validation(row) if row is not None else None

    # -- generation jobs and images --------------------------------------------------------

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
        ``finished_at`` (timezone-aware) of job ``job_id``; return the updated job.

        Raises:
            InvalidInputError: an unknown field or an invalid value.
            NotFoundError: there is no job ``job_id`` (or no fragment ``fragment_key``).
        """
        validate_key(job_id)
        allowed = {"status", "used_fallback", "fallback_reason", "fragment_key", "finished_at"}
        _check_fields(changes, allowed, "job")
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

    # -- lineage ---------------------------------------------------------------------------

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
