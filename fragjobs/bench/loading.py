"""What the benchmarks load: the model with shared generation settings, workspaces.

Peers (DeepCache, ToMe, diffusers' cache hooks) live in :mod:`fragjobs.bench.peers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fragjobs.bench.peers import peer_pipeline
from fragjobs.config import Settings

__all__ = ["embedded_settings", "load_for_bench", "peer_pipeline"]  # peer_pipeline: memory.py


def load_for_bench(
    model: str, *, size: int | None, steps: int | None, batch_size: int
) -> tuple[Any, Any]:
    """The model (in a throwaway data folder) and the generation settings every method shares.

    Square images of ``size`` (default: the model's own), ``steps`` (default: the model's),
    the model's guidance scale: :func:`fragjobs.generation.memory_probe.load_for_probe`, so
    that the benchmark and its memory probe load alike.
    """
    from fragjobs.generation.memory_probe import load_for_probe

    return load_for_probe(model, size=size, steps=steps, batch_size=batch_size)


def embedded_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of an embedded workspace in ``data_dir`` (SQLite catalog, local store).

    ``FRAGJOBS_DATABASE_URL``, ``_STORAGE_URL``, ``_CACHE_DIR`` and ``_THRESHOLDS_PATH`` in
    the environment are ignored; ``overrides`` set any field.
    """
    unset = dict.fromkeys(("database_url", "storage_url", "cache_dir", "thresholds_path"))
    return Settings(data_dir=data_dir, **{**unset, **overrides})
