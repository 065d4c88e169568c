"""What the benchmarks load: the model with shared generation settings, peers, workspaces."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fragjobs.config import Settings


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


@contextlib.contextmanager
def peer_pipeline(pipe: Any, name: str) -> Iterator[Any]:
    """The base pipeline with a peer method switched on, switched off afterwards."""
    if name.startswith("deepcache"):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=int(name.split("_")[1]), cache_branch_id=0)
        helper.enable()
        try:
            yield pipe
        finally:
            helper.disable()
    else:
        import tomesd

        tomesd.apply_patch(pipe, ratio=float(name.split("_")[1]))
        try:
            yield pipe
        finally:
            tomesd.remove_patch(pipe)


def embedded_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of an embedded workspace in ``data_dir`` (SQLite catalog, local store).

    ``FRAGJOBS_DATABASE_URL``, ``_STORAGE_URL``, ``_CACHE_DIR`` and ``_THRESHOLDS_PATH`` in
    the environment are ignored; ``overrides`` set any field.
    """
    unset = dict.fromkeys(("database_url", "storage_url", "cache_dir", "thresholds_path"))
    return Settings(data_dir=data_dir, **{**unset, **overrides})
