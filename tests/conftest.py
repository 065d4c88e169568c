"""Shared fixtures: an isolated embedded workspace, the built-in tiny-sd pipeline, a ready
fragment to copy, and the optional services (Redis database, moto S3 server)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fragjobs.config import Settings, get_settings

BENCH_SMALL = {
    "threshold": 0.75,
    "fidelity": 0.9,
    "steps": 4,
    "size": None,
    "batch_size": 2,
    "repeats": 2,
    "log": lambda _line: None,
}
"""``bench_model`` settings of the quick benchmark tests: 4 steps, batch 2, two repeats."""


@pytest.fixture(autouse=True)
def _quiet_libraries():
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(2)


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    """Settings of a fresh embedded workspace under tmp_path (also set in the environment).

    The chain's tests test a prompt's own chain unless they ask for the model-level fragment
    (``model_level=True``, tests/chain/test_model_level.py): building it profiles six
    calibration prompts, which no other test needs."""
    monkeypatch.setenv("FRAGJOBS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FRAGJOBS_MODEL_LEVEL", "false")
    for var in ("FRAGJOBS_DATABASE_URL", "FRAGJOBS_STORAGE_URL", "FRAGJOBS_THRESHOLDS_PATH"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def gate_ssim_min(settings, tmp_path, monkeypatch):
    """Sets the quality gate's ``ssim_min`` (a copy of thresholds.yaml, only that changed),
    and its ``colour_delta_e_max`` when given."""
    from importlib.resources import files

    text = files("fragjobs").joinpath("thresholds.yaml").read_text()
    path = tmp_path / "gate.yaml"
    monkeypatch.setattr(settings, "thresholds_path", path)

    def set_ssim_min(value: float, colour_delta_e_max: float | None = None) -> None:
        body = text.replace("ssim_min: 0.85", f"ssim_min: {value}")
        if colour_delta_e_max is not None:
            body = body.replace(
                "colour_delta_e_max: 12", f"colour_delta_e_max: {colour_delta_e_max}"
            )
        path.write_text(body)

    return set_ssim_min


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


# -- services shared by several test modules ------------------------------------------------
#
# Redis, PostgreSQL and moto are optional: a test that needs one is skipped with the reason.

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
S3_REGION = "us-east-1"
AWS_TEST_ENV = {
    # Dummy credentials, and no user AWS config that could point elsewhere.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def service_reachable(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (within a second)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


PG_SERVER = "postgres@127.0.0.1:5432"
PG_ADMIN_URL = f"postgresql://{PG_SERVER}/postgres"


@functools.cache
def postgres_unavailable() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'fragjobs[dev]')"
    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return f"PostgreSQL server at {PG_ADMIN_URL} is not reachable: {exc}"
    return None


@contextlib.contextmanager
def scratch_postgres_url(prefix: str = "fragjobs_test") -> Iterator[str]:
    """An empty PostgreSQL database of the caller's own (its SQLAlchemy URL), dropped after;
    skips the test when the server is not usable."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema) on each backend: a SQLite file, or a PostgreSQL
    database of the test's own, dropped after."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    with scratch_postgres_url() as url:
        yield url


@pytest.fixture
def backend_catalog(backend_db_url: str) -> Iterator[Any]:
    """A migrated, empty catalog on each backend (see :func:`backend_db_url`)."""
    from fragjobs.catalog import Catalog, upgrade_database

    upgrade_database(backend_db_url)
    with Catalog(backend_db_url) as opened:
        yield opened


@dataclass
class RedisDatabase:
    """An empty Redis database of a test's own: its URL and a client on it."""

    url: str
    client: Any


@contextlib.contextmanager
def _scratch_redis() -> Iterator[RedisDatabase]:
    if not service_reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"needs the Redis server at {REDIS_HOST}:{REDIS_PORT}")
    import redis

    from fragjobs.errors import ConfigError
    from fragjobs.farm import scratch_redis_database

    try:
        with scratch_redis_database(REDIS_HOST, REDIS_PORT) as url:
            client = redis.Redis.from_url(url)
            try:
                yield RedisDatabase(url, client)
            finally:
                client.close()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def redis_db() -> Iterator[RedisDatabase]:
    """An empty Redis database (1-15) claimed for this test, flushed afterwards."""
    with _scratch_redis() as database:
        yield database


@pytest.fixture(scope="module")
def module_redis_db() -> Iterator[RedisDatabase]:
    """An empty Redis database claimed for a whole test module, flushed afterwards."""
    with _scratch_redis() as database:
        yield database


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of a moto S3 server (HTTP, free local port) for the whole test session."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server]")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials in the environment (:data:`AWS_TEST_ENV`)."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    for name in AWS_UNSET:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_admin(moto_endpoint: str, aws_env: None) -> Any:
    """A plain boto3 client, for what the store must not do: create buckets, tamper."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint, region_name=S3_REGION)


@pytest.fixture
def s3_bucket(s3_admin: Any) -> str:
    """A fresh, empty bucket of this test's own."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_admin.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_store(moto_endpoint: str, s3_bucket: str) -> Any:
    """An S3Store at ``s3://<fresh bucket>/farm`` with a 5 MiB multipart threshold."""
    from fragjobs.storage import S3Store

    return S3Store(
        f"s3://{s3_bucket}/farm",
        endpoint_url=moto_endpoint,
        region=S3_REGION,
        multipart_threshold=5 * 2**20,
        multipart_chunksize=5 * 2**20,
    )


@dataclass(frozen=True)
class FragmentTemplate:
    """An embedded data folder (SQLite catalog + local store) holding one ready fragment."""

    data_dir: Path
    key: str
    prompt: str

    def copy_to(self, folder: Path) -> Settings:
        """Copy the data folder to ``folder``; return settings of the copy (never edit ours)."""
        shutil.copytree(self.data_dir, folder)
        return Settings(
            data_dir=folder,
            database_url=None,
            storage_url=None,
            cache_dir=None,
            thresholds_path=None,
        )


@pytest.fixture(scope="session")
def ready_fragment_template(tmp_path_factory: pytest.TempPathFactory) -> FragmentTemplate:
    """A tiny-sd fragment that passed its gate, built once per session (cheap settings)."""
    from fragjobs import chain

    data_dir = tmp_path_factory.mktemp("template") / "data"
    settings = Settings(data_dir=data_dir, database_url=None, storage_url=None)
    workspace = chain.Workspace.open(settings)
    prompt = "a red circle"
    try:
        prof = chain.profile(
            prompt, model="tiny-sd", seeds=[0, 1], steps=4, ws=workspace, progress=False
        )
        ext = chain.extract(prof.profile_id, ws=workspace, model="tiny-sd")
        val = chain.validate(ext.key, seeds=[1000, 1001], ws=workspace, progress=False)
    finally:
        workspace.close()
    if not val.passed:
        pytest.fail(f"the template fragment failed its gate: {val.gate}")
    return FragmentTemplate(data_dir, ext.key, prompt)
