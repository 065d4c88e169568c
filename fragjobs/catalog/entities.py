"""The catalog's entities: frozen dataclasses of plain values, and the row → entity converters.

ORM rows never leave the catalog package; every ``Catalog`` method returns one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from models import (
    Base,
    BaseModelRow,
    FragmentRow,
    GenerationJobRow,
    ImageRow,
    ProfileRow,
    ValidationRow,
)


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
    prompt_hash: str | None = None
    pinned: bool = False
    placement: str = "shared"


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
    metrics: dict[str, Any] | None = None


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
