"""A two-node farm of the drill's own: services, worker nodes, a client, and what a drill needs.

:class:`FarmProcesses` runs processes of the farm (``fragjobs farm start`` nodes, Flower),
each in a session of its own with its output in ``<root>/<name>/out.log``, and kills them all
at the end; ``tests/farm/test_farm_integration.py`` drives its nodes with it too.

:class:`DrillFarm` starts, on spare ports of 127.0.0.1, a Redis and a PostgreSQL of its own
(:mod:`fragjobs.drills.services`), moto's S3 server with a fresh bucket, upgrades the catalog
(``fragjobs db upgrade``) and starts two nodes of one CPU worker each (``drillA``, ``drillB``),
with the model, steps and task time limits of :class:`DrillSettings`. It hands the drills
a :class:`fragjobs.client.Farm`, the store, an S3 client for tampering behind the store's
back, the workers' process ids and their logs. :meth:`DrillFarm.close` stops everything,
also after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragjobs.config import Settings
from fragjobs.drills.services import LocalPostgres, LocalRedis, MotoS3, postgres_bindir

NODES = ("drillA", "drillB")
WORKERS = {node: f"cpu0@{node}" for node in NODES}
S3_REGION = "us-east-1"
DUMMY_AWS_ENV = {
    # moto takes any credentials; no user AWS configuration may point elsewhere.
    "AWS_ACCESS_KEY_ID": "drills",
    "AWS_SECRET_ACCESS_KEY": "drills",
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
START_TIMEOUT_S = 240.0
_SUCCEEDED = re.compile(r"Task (fragjobs\.[a-z_]+)\[([0-9a-f-]{36})\] succeeded in")
_RECEIVED = re.compile(r"Task (fragjobs\.[a-z_]+)\[([0-9a-f-]{36})\] received")


class FarmProcesses:
    """Subprocesses of the farm, each in its own session (so killed as a whole at the end).

    Args:
        env: the environment they share.
        root: ``<root>/<name>/`` holds each one's ``out.log`` (and a node's data and cache).
    """

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env, self.root = env, root
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], **extra_env: str) -> subprocess.Popen:
        """Start ``command`` as ``name`` in ``<root>/<name>`` (not the checkout: the launcher
        must find ``celeryconfig`` itself)."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as log:
            process = subprocess.Popen(
                command,
                env={**self.env, **extra_env},
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[name] = process
        return process

    def start_node(self, node: str, *extra_args: str) -> subprocess.Popen:
        """``fragjobs farm start --cpu-workers 1 --node <node>`` with its own data and cache."""
        command = [sys.executable, "-m", "fragjobs.cli", "farm", "start"]
        return self.start(
            node,
            [*command, "--cpu-workers", "1", "--node", node, *extra_args],
            FRAGJOBS_DATA_DIR=str(self.root / node / "data"),
            FRAGJOBS_CACHE_DIR=str(self.cache_dir(node)),
        )

    def cache_dir(self, node: str) -> Path:
        """The node's warm cache folder."""
        return self.root / node / "cache"

    def log_path(self, name: str) -> Path:
        """Where ``name``'s output goes."""
        return self.root / name / "out.log"

    def log(self, name: str, chars: int = 4000) -> str:
        """The end of ``name``'s output."""
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def kill_all(self) -> None:
        """SIGKILL every process group started here; wait for each."""
        for process in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def fragjobs_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``python -m fragjobs.cli <args>`` with ``env``; its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "fragjobs.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class DrillSettings:
    """How the drill's farm runs.

    Args:
        soft_time_limit, time_limit: the tasks' limits (``FRAGJOBS_TASK_SOFT_TIME_LIMIT``,
            ``FRAGJOBS_TASK_TIME_LIMIT``). A whole worker's tasks are redelivered
            ``time_limit`` + 60 s after they started (the visibility timeout), so the drill
            keeps them small.
        steps: inference steps of the chain (so of the fragment and its generations).
        redis_persistence: the drill's Redis keeps an append-only file (as deployed).
        pg_bindir: PostgreSQL's binaries (default: found).
        model: the model of every job.
    """

    soft_time_limit: int = 60
    time_limit: int = 90
    steps: int = 4
    redis_persistence: bool = True
    pg_bindir: str | None = None
    model: str = "tiny-sd"

    def knobs(self) -> dict[str, Any]:
        """The knobs of every job the drills submit: small model, few steps and seeds."""
        return {
            "model": self.model,
            "steps": self.steps,
            "profile_seeds": [0, 1],
            "validation_seeds": [1000, 1001],
        }


class DrillFarm:
    """Services, two worker nodes and a client, all the drill's own (see the module doc).

    Use as a context manager: everything started is stopped on the way out.
    """

    def __init__(self, folder: Path, settings: DrillSettings) -> None:
        self.folder = folder
        self.settings = settings
        self.redis = LocalRedis(folder / "redis", persistence=settings.redis_persistence)
        self.postgres: LocalPostgres | None = None
        self.moto = MotoS3(folder / "moto")
        self.bucket = f"drills-{uuid.uuid4().hex[:12]}"
        self.env: dict[str, str] = {}
        self.processes: FarmProcesses | None = None
        self.farm: Any = None
        self.store: Any = None
        self.s3: Any = None
        self._saved_env: dict[str, str | None] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> DrillFarm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the services, upgrade the catalog, start both nodes, open the client."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.postgres = LocalPostgres(postgres_bindir(self.settings.pg_bindir))
        self.postgres.init()
        self.moto.start()
        self.env = self._environment()
        self._use_environment()
        self._create_bucket()
        upgrade = fragjobs_cli(self.env, "db", "upgrade")
        if upgrade.returncode != 0:
            raise RuntimeError(f"fragjobs db upgrade failed: {upgrade.stderr.strip()[-1500:]}")
        self.processes = FarmProcesses(self.env, self.folder / "nodes")
        for node in NODES:
            self.processes.start_node(node)
        from fragjobs.client import Farm
        from fragjobs.storage import S3Store

        self.farm = Farm(Settings())
        self.store = S3Store(
            self.env["FRAGJOBS_STORAGE_URL"], endpoint_url=self.moto.endpoint, region=S3_REGION
        )
        self.wait_for_workers(set(WORKERS.values()))

    def close(self) -> None:
        """Stop the nodes, the client, the services; remove PostgreSQL's folder."""
        if self.processes is not None:
            self.processes.kill_all()
        if self.farm is not None:
            with contextlib.suppress(Exception):
                self.farm.close()
        self.redis.stop()
        if self.postgres is not None:
            self.postgres.remove()
        self.moto.stop()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    def _environment(self) -> dict[str, str]:
        """What every process of the farm sees: our services only, 127.0.0.1 only."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FRAGJOBS_", "AWS_", "FLOWER_")) and k not in AWS_UNSET
        }
        env.update(DUMMY_AWS_ENV)
        settings = self.settings
        env.update(
            FRAGJOBS_DATABASE_URL=self.postgres.url,
            FRAGJOBS_BROKER_URL=self.redis.url(0),
            FRAGJOBS_STORAGE_URL=f"s3://{self.bucket}/farm",
            FRAGJOBS_S3_ENDPOINT_URL=self.moto.endpoint,
            FRAGJOBS_DATA_DIR=str(self.folder / "client"),
            FRAGJOBS_DEVICE="cpu",
            FRAGJOBS_DEFAULT_MODEL=settings.model,
            FRAGJOBS_TASK_SOFT_TIME_LIMIT=str(settings.soft_time_limit),
            FRAGJOBS_TASK_TIME_LIMIT=str(settings.time_limit),
            FRAGJOBS_REVALIDATE_INTERVAL_S="0",
            OMP_NUM_THREADS="1",  # two workers on a small machine: one thread each
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            DIFFUSERS_VERBOSITY="error",
            TRANSFORMERS_VERBOSITY="error",
        )
        return env

    def _use_environment(self) -> None:
        """This process's client reads the same settings (``celeryconfig`` reads them too)."""
        for name in set(self.env) | {k for k in os.environ if k.startswith("FRAGJOBS_")}:
            self._saved_env.setdefault(name, os.environ.get(name))
        for name in list(os.environ):
            if name.startswith("FRAGJOBS_") and name not in self.env:
                del os.environ[name]
        os.environ.update(self.env)

    def _create_bucket(self) -> None:
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=self.moto.endpoint, region_name=S3_REGION)
        self.s3.create_bucket(Bucket=self.bucket)

    @property
    def redelivery_s(self) -> float:
        """When the tasks of a killed worker are handed out again: the visibility timeout."""
        return float(self.farm.app.conf.broker_transport_options["visibility_timeout"])

    # -- workers -----------------------------------------------------------------------------

    def wait_for_workers(self, hostnames: set[str], timeout: float = START_TIMEOUT_S) -> float:
        """Wait until every worker in ``hostnames`` answers ``ping``; return the seconds.

        Raises:
            RuntimeError: a node exited, or they did not answer within ``timeout``.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            for name, process in self.processes.running.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"node {name} exited with {process.returncode}:\n{self.processes.log(name)}"
                    )
            with contextlib.suppress(Exception):
                replies = self.farm.app.control.inspect(timeout=1).ping() or {}
                if hostnames <= set(replies):
                    return time.monotonic() - started
            time.sleep(0.5)
        raise RuntimeError(f"workers {sorted(hostnames)} did not answer within {timeout:.0f} s")

    def worker_processes(self, hostname: str) -> tuple[int, list[int]]:
        """The worker's main process id and its pool processes' ids (``inspect stats``)."""
        stats = self.farm.app.control.inspect(destination=[hostname], timeout=2).stats() or {}
        if hostname not in stats:
            raise RuntimeError(f"worker {hostname} did not answer inspect stats")
        mine = stats[hostname]
        return int(mine["pid"]), [int(p) for p in mine["pool"].get("processes", [])]

    def task_pid(self, hostname: str, task_id: str) -> int | None:
        """The pool process running ``task_id`` on ``hostname`` (``inspect active``)."""
        active = self.farm.app.control.inspect(destination=[hostname], timeout=2).active() or {}
        pids = [t["worker_pid"] for t in active.get(hostname, []) if t["id"] == task_id]
        return pids[0] if pids else None

    def worker_log(self) -> str:
        """Both nodes' output so far."""
        return "".join(
            self.processes.log_path(node).read_text(errors="replace")
            for node in NODES
            if self.processes.log_path(node).is_file()
        )

    def task_runs(self) -> tuple[dict[str, int], dict[str, int]]:
        """How often each task id was received and succeeded, from the workers' logs."""
        text = self.worker_log()
        received: dict[str, int] = {}
        succeeded: dict[str, int] = {}
        for _, task_id in _RECEIVED.findall(text):
            received[task_id] = received.get(task_id, 0) + 1
        for _, task_id in _SUCCEEDED.findall(text):
            succeeded[task_id] = succeeded.get(task_id, 0) + 1
        return received, succeeded

    # -- the broker --------------------------------------------------------------------------

    def unacked_task_ids(self) -> set[str]:
        """Tasks delivered and not acknowledged: running, or to be handed out again once the
        visibility timeout has passed (kombu's ``unacked`` hash)."""
        client = self.farm.app.backend.client
        ids = set()
        for raw in client.hvals("unacked"):
            with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                ids.add(json.loads(raw)[0]["headers"]["id"])
        return ids

    def broker_snapshot(self) -> dict[str, int]:
        """Every key of the broker's database with its size (list length, hash length, 1).

        Read through the client's Celery app (the farm side owns the Redis connection).
        """
        client = self.farm.app.backend.client
        out = {}
        for raw in client.scan_iter(count=1000):
            name = raw.decode(errors="replace")
            kind = client.type(raw).decode()
            size = {"list": client.llen, "hash": client.hlen, "zset": client.zcard}.get(kind)
            out[name] = int(size(raw)) if size else 1
        return out
