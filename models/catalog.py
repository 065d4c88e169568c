"""The catalog's tables (DESIGN §4), declared once with the SQLAlchemy 2 ORM.

Only :mod:`fragjobs.catalog` reads or writes these rows; everything else sees its entities.
Schema changes go through alembic (``migrations/``), whose ``env.py`` uses :data:`metadata`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

FRAGMENT_STATUSES = ("building", "ready", "failed_gate", "corrupt", "evicted")
FRAGMENT_PLACEMENTS = ("shared", "local")
JOB_STATUSES = ("queued", "running", "done", "failed")

# Deterministic constraint names, so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as naive
    UTC and given back their UTC zone on the way out. Naive datetimes are refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC (naive UTC for SQLite)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return the stored value as an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(values: tuple[str, ...]) -> str:
    return "status IN ({})".format(", ".join(f"'{v}'" for v in values))


class Base(DeclarativeBase):
    """Declarative base of every catalog table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[int]: JSON}


metadata = Base.metadata


class BaseModelRow(Base):
    """A base diffusers model, identified by the sha256 of its weights and name."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProfileRow(Base):
    """Profiling statistics of one base model on one prompt."""

    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    profile_id: Mapped[str] = mapped_column(String(200), unique=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    prompt_hash: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]]
    stats_uri: Mapped[str] = mapped_column(Text)
    stats_sha256: Mapped[str] = mapped_column(String(64))
    importance_uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    base_model: Mapped[BaseModelRow] = relationship(lazy="joined")


class FragmentRow(Base):
    """A fragment: a prompt-specialised edit of a base model, stored as a folder of objects."""

    __tablename__ = "fragments"
    __table_args__ = (
        CheckConstraint(_in(FRAGMENT_STATUSES), name="status"),
        CheckConstraint(_in(FRAGMENT_PLACEMENTS), name="placement"),
        Index("ix_fragments_lookup", "base_model_id", "status", "prompt_hash"),
        Index("ix_fragments_changes", "base_model_id", "updated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("profiles.id"), index=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    storage_uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    hit_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    prompt_hash: Mapped[str | None] = mapped_column(String(64))
    """sha256 of the normalised prompt (``fragjobs.keys.prompt_hash``): the exact lookup."""
    prompt_embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The prompt's pooled text embedding as little-endian float32 bytes: the similar lookup."""
    pinned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """A pinned fragment is never evicted by the library's size cap."""
    placement: Mapped[str] = mapped_column(
        String(16), default="shared", server_default=text("'shared'")
    )
    """``shared``: in the shared library; ``local``: kept only on the node that built it."""

    profile: Mapped[ProfileRow] = relationship(lazy="joined")


class ValidationRow(Base):
    """One quality-gate run of a fragment against its base model."""

    __tablename__ = "validations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fragment_id: Mapped[int] = mapped_column(
        ForeignKey("fragments.id", ondelete="CASCADE"), index=True
    )
    metrics: Mapped[dict[str, Any]]
    passed: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    fragment: Mapped[FragmentRow] = relationship(lazy="joined")


class GenerationJobRow(Base):
    """A request to generate seed variants of a prompt, with a fragment or the full model."""

    __tablename__ = "generation_jobs"
    __table_args__ = (CheckConstraint(_in(JOB_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(200), unique=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    fragment_id: Mapped[int | None] = mapped_column(
        ForeignKey("fragments.id", ondelete="SET NULL"), index=True
    )
    prompt: Mapped[str] = mapped_column(Text)
    seeds: Mapped[list[int]]
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    used_fallback: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    fallback_reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]
    """What the job measured and did (batch sizes, memory steps taken on out-of-memory)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    fragment: Mapped[FragmentRow | None] = relationship(lazy="joined")


class ImageRow(Base):
    """One generated image: the output of one seed of one job."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "seed"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("generation_jobs.id", ondelete="CASCADE"))
    seed: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[GenerationJobRow] = relationship(lazy="joined")


class TaskDeliveryRow(Base):
    """How often one farm task (by its Celery task id) was delivered: the poison guard."""

    __tablename__ = "task_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_at: Mapped[datetime] = mapped_column(default=utcnow)
