"""Settings, read from the environment (prefix ``FRAGJOBS_``) and optional ``.env`` file.

The embedded default needs no setting at all: the catalog is a SQLite file and the store is a
folder, both under ``data_dir``. The farm is configured only by environment variables.

Example::

    FRAGJOBS_DATABASE_URL=postgresql+psycopg://fragjobs@db/fragjobs
    FRAGJOBS_STORAGE_URL=s3://fragments/prod
    FRAGJOBS_S3_ENDPOINT_URL=http://minio:9000
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_THRESHOLD = 0.75
"""Fraction of attention heads a fragment keeps unless told otherwise."""
DEFAULT_FIDELITY = 0.9
"""SSIM against the full model a fragment keeps on its profiling seeds unless told otherwise."""


class Settings(BaseSettings):
    """All fragjobs settings. Every field can be set as ``FRAGJOBS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="FRAGJOBS_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=Path.home() / ".fragjobs",
        description="Root of the embedded default: SQLite catalog, local store, caches.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the catalog; default sqlite in data_dir."
    )
    storage_url: str | None = Field(
        default=None, description="Object store URL (file:///path or s3://bucket/prefix)."
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto).")
    s3_region: str = "us-east-1"
    cache_dir: Path | None = Field(default=None, description="Node-local warm cache folder.")
    cache_max_bytes: int = Field(default=20 * 2**30, gt=0)
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    default_model: str = "shapes"
    default_threshold: float = Field(default=DEFAULT_THRESHOLD, gt=0, le=1)
    default_fidelity: float = Field(default=DEFAULT_FIDELITY, gt=0, le=1)
    thresholds_path: Path | None = Field(
        default=None, description="thresholds.yaml for the quality gate; default: packaged."
    )
    clip_model_path: Path | None = Field(
        default=None, description="Local CLIPModel folder for CLIP-score; unset → null metric."
    )
    lpips_weights_path: Path | None = Field(
        default=None, description="Local LPIPS backbone weights; unset → null metric."
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    max_variants: int = Field(default=10_000, gt=0)

    @field_validator("data_dir", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def resolved_database_url(self) -> str:
        """The catalog URL, defaulting to ``sqlite:///<data_dir>/catalog.db``."""
        return self.database_url or f"sqlite:///{self.data_dir / 'catalog.db'}"

    @property
    def resolved_storage_url(self) -> str:
        """The store URL, defaulting to ``file://<data_dir>/store``."""
        return self.storage_url or (self.data_dir / "store").resolve().as_uri()

    @property
    def resolved_cache_dir(self) -> Path:
        """The node-local cache folder, defaulting to ``<data_dir>/cache``."""
        return self.cache_dir or self.data_dir / "cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; call ``get_settings.cache_clear()`` in tests)."""
    return Settings()
