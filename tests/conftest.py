"""Shared fixtures: an isolated embedded workspace and the built-in tiny-sd pipeline."""

from __future__ import annotations

import logging

import pytest
import torch

from fragjobs.config import Settings, get_settings


@pytest.fixture(autouse=True)
def _quiet_libraries():
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(2)


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    """Settings of a fresh embedded workspace under tmp_path (also set in the environment)."""
    monkeypatch.setenv("FRAGJOBS_DATA_DIR", str(tmp_path / "data"))
    for var in ("FRAGJOBS_DATABASE_URL", "FRAGJOBS_STORAGE_URL", "FRAGJOBS_THRESHOLDS_PATH"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def ws(settings):
    """An embedded workspace (SQLite + local folder) of its own."""
    from fragjobs import chain

    workspace = chain.Workspace.open(settings)
    yield workspace
    workspace.close()


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny-sd pipeline (shared; tests that edit a UNet work on a copy)."""
    from fragjobs.builtin.configs import build_tiny_sd

    pipe = build_tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    return pipe
