"""Settings, read from the environment (prefix ``FRAGJOBS_``) and a ``.env`` file you name.

A ``.env`` file is read only from the path in ``FRAGJOBS_ENV_FILE``, never from the current
folder: a command run in someone else's checkout must not pick up their settings.

The embedded default needs no setting at all: the catalog is a SQLite file and the store is a
folder, both under ``data_dir``. The farm is configured only by environment variables.

Example::

    FRAGJOBS_DATABASE_URL=postgresql+psycopg://fragjobs@db/fragjobs
    FRAGJOBS_STORAGE_URL=s3://fragments/prod
    FRAGJOBS_S3_ENDPOINT_URL=http://minio:9000
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fragjobs.errors import ConfigError

DEFAULT_THRESHOLD = 0.75
"""Fraction of attention heads a fragment keeps unless told otherwise."""
DEFAULT_FIDELITY = 0.9
"""SSIM against the full model a fragment keeps on its profiling seeds unless told otherwise."""
ENV_FILE_VARIABLE = "FRAGJOBS_ENV_FILE"
"""The one way to have a ``.env`` file read: its path in this variable."""


S = TypeVar("S", bound="Settings")


class Settings(BaseSettings):
    """All fragjobs settings. Every field can be set as ``FRAGJOBS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="FRAGJOBS_", env_file=None, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment first, then the ``.env`` file named by ``FRAGJOBS_ENV_FILE``.

        Raises:
            ConfigError: ``FRAGJOBS_ENV_FILE`` names something that is not a file.
        """
        named = os.environ.get(ENV_FILE_VARIABLE)
        if named:
            if not Path(named).is_file():
                raise ConfigError(f"{ENV_FILE_VARIABLE}={named} is not a file")
            dotenv_settings = DotEnvSettingsSource(settings_cls, env_file=named)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

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
    cache_max_bytes: int = Field(
        default=20 * 2**30, gt=0, description="Size cap of the node's warm fragment cache."
    )
    base_cache_max_bytes: int = Field(
        default=100 * 2**30,
        gt=0,
        description="Size cap of the node's base-model cache (bases fetched from the store).",
    )
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None
    default_model: str = "shapes"
    default_threshold: float = Field(default=DEFAULT_THRESHOLD, gt=0, le=1)
    default_fidelity: float = Field(default=DEFAULT_FIDELITY, gt=0, le=1)
    model_level: bool = Field(
        default=True,
        description=(
            "fragjobs run tries the base's model-level fragment (extracted once per base, "
            "gated per prompt) before extracting the prompt's own."
        ),
    )
    thresholds_path: Path | None = Field(
        default=None, description="thresholds.yaml for the quality gate; default: packaged."
    )
    clip_model_path: Path | None = Field(
        default=None, description="Local CLIPModel folder for CLIP-score; unset → null metric."
    )
    lpips_weights_path: Path | None = Field(
        default=None, description="Local LPIPS backbone weights; unset → null metric."
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|mps|cuda|cuda:\d+)$",
        description="'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'.",
    )
    int8_execution: str = Field(
        default="auto",
        pattern=r"^(auto|int_mm|qlinear_dynamic|float|dequantize)$",
        description="How a fragment's int8 layers compute when it is loaded for generation: "
        "'auto' (an int8 matmul where the device has a fast one, else dequantised once at "
        "load: float weights held), 'int_mm', 'qlinear_dynamic', 'float' (dequantised once) or "
        "'dequantize' (int8 held, dequantised every call: least memory, slowest).",
    )
    max_variants: int = Field(default=10_000, gt=0)
    memory_budget_mb: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Memory a node's generation may use, in MiB; default: the device's free "
        "memory × 0.8, read when a job starts.",
    )
    library_max_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Size cap of the shared fragment library, in bytes: when a fragment becomes "
        "ready, least recently used unpinned ones are evicted past it (rebuilt from their "
        "profile when asked for again); a fragment larger than the cap is refused. Unset: "
        "no cap.",
    )
    cache_weight_extraction_cost: float = Field(
        default=1.0,
        ge=0,
        description="should_cache_fragment: weight of the extraction seconds saved.",
    )
    cache_weight_size: float = Field(
        default=1.0,
        ge=0,
        description="should_cache_fragment: weight of its size relative to the cap.",
    )
    cache_weight_popularity: float = Field(
        default=1.0, ge=0, description="should_cache_fragment: weight of the prompt's jobs."
    )
    cache_weight_similar_reuse: float = Field(
        default=1.0, ge=0, description="should_cache_fragment: weight of similar prompts' jobs."
    )
    cache_share_threshold: float = Field(
        default=0.0,
        description="should_cache_fragment: a score at or above this goes to the shared "
        "library, below it stays node-local.",
    )

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
    """The process-wide settings (read once; call ``get_settings.cache_clear()`` in tests).

    Raises:
        ConfigError: a ``FRAGJOBS_*`` variable has a value that cannot be used (one line
            naming the variable).
    """
    return load_settings(Settings)


def load_settings(cls: type[S]) -> S:
    """``cls()`` from the environment, a bad value reported as one ConfigError line."""
    from pydantic import ValidationError

    from fragjobs.errors import ConfigError

    try:
        return cls()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else "?"
        raise ConfigError(
            f"FRAGJOBS_{field.upper()}: {first['msg']} (got {first.get('input')!r})"
        ) from None
