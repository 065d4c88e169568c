"""Two real worker nodes on Redis + PostgreSQL + a shared local-folder store, driven by Farm.

Needs the Redis server at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (user postgres,
trust auth); skipped without them. The test makes its own database (dropped afterwards), its
own empty Redis database (flushed afterwards) and its own store; each node has its own data
and cache folders, as separate machines would.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fragjobs.config import Settings
from fragjobs.keys import generation_object
from fragjobs.storage import open_store

PROMPT = "a red circle"
REDIS = ("127.0.0.1", 6379)
POSTGRES = ("127.0.0.1", 5432)
ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
START_TIMEOUT_S = 150
CHAIN_TIMEOUT_S = 240


def _reachable(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not (_reachable(REDIS) and _reachable(POSTGRES)),
    reason="needs Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432",
)


@pytest.fixture
def database_url():
    """A fresh, empty PostgreSQL database of our own (dropped WITH (FORCE) afterwards)."""
    psycopg = pytest.importorskip("psycopg")
    name = f"fragjobs_it_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{name}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def broker_url():
    """An empty Redis database of our own (flushed afterwards)."""
    import redis

    free = [n for n in range(1, 16) if redis.Redis(*REDIS, db=n).dbsize() == 0]
    if not free:
        pytest.skip("no empty Redis database (1-15) to use")
    number = random.choice(free)
    yield f"redis://{REDIS[0]}:{REDIS[1]}/{number}"
    client = redis.Redis(*REDIS, db=number)
    client.flushdb()
    client.close()


@pytest.fixture
def farm_env(tmp_path, database_url, broker_url):
    """The environment shared by every process of the farm (client, CLI, workers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAGJOBS_")}
    env.update(
        FRAGJOBS_DATABASE_URL=database_url,
        FRAGJOBS_BROKER_URL=broker_url,
        FRAGJOBS_STORAGE_URL=(tmp_path / "store").as_uri(),
        FRAGJOBS_DATA_DIR=str(tmp_path / "client"),
        FRAGJOBS_DEVICE="cpu",
        OMP_NUM_THREADS="1",  # two workers on two cores: one thread each
        DIFFUSERS_VERBOSITY="error",
        TRANSFORMERS_VERBOSITY="error",
    )
    return env


class Nodes:
    """``fragjobs farm start`` launchers, each in its own process group (killed at the end)."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env, self.root = env, root
        self.launchers: dict[str, subprocess.Popen] = {}

    def start(self, node: str) -> subprocess.Popen:
        folder = self.root / node
        folder.mkdir(parents=True, exist_ok=True)
        env = {
            **self.env,
            "FRAGJOBS_DATA_DIR": str(folder / "data"),
            "FRAGJOBS_CACHE_DIR": str(folder / "cache"),
        }
        command = [sys.executable, "-m", "fragjobs.cli", "farm", "start"]
        with (folder / "farm.log").open("ab") as log:
            launcher = subprocess.Popen(
                [*command, "--cpu-workers", "1", "--node", node],
                env=env,
                cwd=folder,  # not the checkout: the launcher must find celeryconfig itself
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.launchers[node] = launcher
        return launcher

    def log(self, node: str) -> str:
        return (self.root / node / "farm.log").read_text(errors="replace")[-4000:]

    def kill_all(self) -> None:
        for launcher in self.launchers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


@pytest.fixture
def nodes(farm_env, tmp_path):
    nodes = Nodes(farm_env, tmp_path / "nodes")
    yield nodes
    nodes.kill_all()


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fragjobs.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_for_workers(farm, nodes: Nodes, hostnames: set[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for node, launcher in nodes.launchers.items():
            if launcher.poll() is not None:
                pytest.fail(f"{node} exited with {launcher.returncode}:\n{nodes.log(node)}")
        replies = farm.app.control.inspect(timeout=1).ping() or {}
        if hostnames <= set(replies):
            return
        time.sleep(1)
    pytest.fail(f"workers {hostnames} not up after {START_TIMEOUT_S} s")


def _stop(nodes: Nodes, node: str) -> None:
    """SIGTERM to the launcher only: it must stop its workers and exit 0."""
    launcher = nodes.launchers[node]
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 0, nodes.log(node)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(launcher.pid, 0)
        except ProcessLookupError:
            return  # no process of the node is left
        time.sleep(0.5)
    pytest.fail(f"{node}'s workers outlived their launcher")


def test_two_nodes_run_the_chain_and_reuse_the_fragment(farm_env, nodes):
    from fragjobs.client import Farm

    # An out-of-date catalog is refused at start-up, with the command that fixes it.
    refused = nodes.start("nodeA")
    assert refused.wait(timeout=START_TIMEOUT_S) != 0
    assert "fragjobs db upgrade" in nodes.log("nodeA")
    upgrade = _cli(farm_env, "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr

    nodes.start("nodeA")
    nodes.start("nodeB")
    settings = Settings(
        **{
            name: farm_env[f"FRAGJOBS_{name.upper()}"]
            for name in ("database_url", "broker_url", "storage_url", "data_dir")
        }
    )
    with Farm(settings) as farm:
        _wait_for_workers(farm, nodes, {"cpu0@nodeA", "cpu0@nodeB"})
        status = _cli(farm_env, "farm", "status", timeout=60)
        assert status.returncode == 0, status.stderr
        assert "cpu0@nodeA  queues=gpu,gpu.nodeA.cpu0" in status.stdout
        assert "cpu0@nodeB  queues=gpu,gpu.nodeB.cpu0" in status.stdout

        job = farm.submit(PROMPT, variants=4, model="tiny-sd", batch_size=2)
        result = job.wait(timeout=CHAIN_TIMEOUT_S)
        catalog, store = farm.catalog, open_store(settings.storage_url)

        [fragment] = catalog.list_fragments()
        assert fragment.status in ("ready", "failed_gate")
        validation = catalog.latest_validation(fragment.key)
        assert validation is not None and validation.passed == (fragment.status == "ready")
        images = []
        for job_id in result.job_ids:
            row = catalog.get_job(job_id)
            assert (row.status, row.attempts) == ("done", 1)
            images += catalog.list_images(job_id)
        assert sorted(img.seed for img in images) == [0, 1, 2, 3]
        assert sorted(img.uri for img in images) == sorted(result.image_uris)
        for img in images:  # in the shared store, with the bytes the catalog recorded
            store.get_bytes(generation_object(img.job_id, f"{img.seed}.png"), img.sha256)
        lineage = result.lineage
        assert lineage["fragment_key"] == fragment.key
        assert lineage["base_model"]["name"] == "tiny-sd"
        assert lineage["profile_id"] == fragment.profile_id
        assert lineage["validation_ids"] == [validation.id]
        if fragment.status == "ready":
            assert result.fragment_key == fragment.key
            assert lineage["job_ids"] == sorted(result.job_ids)
            assert lineage["image_count"] == 4
        assert job.progress()["state"] == "SUCCESS" and result.errors == []

        again = farm.submit(PROMPT, variants=2, model="tiny-sd")
        second = again.wait(timeout=CHAIN_TIMEOUT_S)
        assert [f.key for f in catalog.list_fragments()] == [fragment.key]  # no new fragment
        assert len(second.image_uris) == 2
        if fragment.status == "ready":
            assert again.reused_fragment == fragment.key and again.stage_task_ids == {}
            assert second.fragment_key == fragment.key

        stats = farm.app.control.inspect(timeout=2).stats() or {}
        generated = sum(s["total"].get("fragjobs.generate", 0) for s in stats.values())
        assert generated == len(result.job_ids) + len(second.job_ids)

    _stop(nodes, "nodeA")
    _stop(nodes, "nodeB")
