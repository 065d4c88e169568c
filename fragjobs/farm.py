"""Launch, watch and route to the farm's Celery workers (DESIGN §5).

Commands: ``fragjobs farm start|status|run`` and ``fragjobs flower``.

``fragjobs farm start --gpus 0,1 --node n1`` runs one ``celery -A tasks.app worker``
subprocess per GPU, pinned with ``CUDA_VISIBLE_DEVICES=<i>``, with one prefork pool process
(``--concurrency 1``), consuming the shared queue ``gpu`` and its own ``gpu.<node>.<i>``
(hostname ``gpu<i>@<node>``). ``--cpu-workers N`` runs N workers without a GPU
(``CUDA_VISIBLE_DEVICES=""``; hostname ``cpu<i>@<node>``, own queue ``gpu.<node>.cpu<i>``);
they consume the shared ``gpu`` queue too, so a CPU-only machine can serve the same chain.

This launcher never imports torch or celery: CUDA is initialised only in the pool processes,
after fork. SIGTERM and SIGINT are forwarded to the workers as SIGTERM (warm shutdown: each
finishes its running task). When a worker exits on its own, the others are stopped and the
launcher exits non-zero, so a supervisor restarts the whole node.

**Fragment affinity.** A worker advertises the fragments whose UNets it holds warm in its
pool process (:func:`fragjobs.chain.warm_fragment_keys`) in the broker's Redis: one key per
worker, ``fragjobs:warm:<hostname>`` → ``{"queue", "fragments", "updated_at"}`` (JSON), with a
time-to-live of ``FRAGJOBS_AFFINITY_TTL_S`` seconds. It is rewritten after every generate task,
deleted when a pool process starts (a new process holds nothing) and when the worker stops.
:class:`WarmRegistry` reads and writes it; :class:`fragjobs.client.Farm` routes a generate
batch to the own queue of a holder that replies to ``inspect`` with no running task and an
empty own queue, otherwise to the shared queue. With a broker other than Redis there is no
registry and every batch goes to the shared queue.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from pydantic import Field, SecretStr, model_validator

from fragjobs.config import Settings

log = logging.getLogger("fragjobs.farm")

SHARED_QUEUE = "gpu"
NODE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
WARM_KEY_PREFIX = "fragjobs:warm:"
"""Redis key prefix of the fragment-affinity advertisements (one key per worker hostname)."""
_SCRATCH_CLAIM_PREFIX = "fragjobs:scratch-db:"
_POLL_S = 0.5


class FarmSettings(Settings):
    """:class:`fragjobs.config.Settings` plus the farm-only ``FRAGJOBS_*`` settings.

    * ``task_soft_time_limit`` (s, default 3600): the task gets ``SoftTimeLimitExceeded``;
    * ``task_time_limit`` (s, default soft limit + 300): the pool process is killed;
    * ``max_task_attempts`` (default 3): a generation job delivered more often than this is
      marked failed instead of being run again (a task that keeps killing its worker);
    * ``revalidate_interval_s`` (default 86400, 0 = never): how often celery beat runs
      ``fragjobs.revalidate``;
    * ``affinity_ttl_s`` (default 3600): how long a worker's warm-fragment advertisement
      lives without being refreshed by a generate task;
    * ``flower_user`` / ``flower_password``: the basic-auth login of ``fragjobs flower``.
    """

    task_soft_time_limit: int = Field(default=3600, gt=0)
    task_time_limit: int | None = Field(default=None, gt=0)
    max_task_attempts: int = Field(default=3, gt=0)
    revalidate_interval_s: int = Field(default=86400, ge=0)
    affinity_ttl_s: int = Field(default=3600, gt=0)
    flower_user: str | None = None
    flower_password: SecretStr | None = None

    @model_validator(mode="after")
    def _hard_limit_after_soft(self) -> FarmSettings:
        if self.task_time_limit is None:
            self.task_time_limit = self.task_soft_time_limit + 300
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError(
                "FRAGJOBS_TASK_TIME_LIMIT must be larger than FRAGJOBS_TASK_SOFT_TIME_LIMIT "
                f"(got {self.task_time_limit} <= {self.task_soft_time_limit})"
            )
        return self


# -- worker processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its Celery hostname, the queues it consumes and the GPU it may see."""

    hostname: str
    queues: tuple[str, ...]
    cuda_visible_devices: str


def default_node() -> str:
    """This machine's short host name, reduced to ``[A-Za-z0-9_-]``."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-")
    return name[:63] or "node"


def parse_gpus(text: str) -> list[int]:
    """``"0,1"`` → ``[0, 1]``: distinct non-negative GPU indices.

    Raises:
        click.BadParameter: anything else.
    """
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"GPU indices are comma-separated integers, got {text!r}") from exc
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise click.BadParameter(f"give distinct non-negative GPU indices, got {text!r}")
    return gpus


def worker_specs(
    *, node: str, gpus: Sequence[int] | None = None, cpu_workers: int | None = None
) -> list[WorkerSpec]:
    """The workers of one node: one per GPU in ``gpus``, or ``cpu_workers`` without a GPU.

    Raises:
        ValueError: both or neither of ``gpus`` / ``cpu_workers``, or an invalid node name.
    """
    if not NODE_PATTERN.match(node):
        raise ValueError(f"node name {node!r} must match {NODE_PATTERN.pattern}")
    if (gpus is None) == (cpu_workers is None):
        raise ValueError("give either GPU indices or a number of CPU workers")
    if gpus is not None:
        return [
            WorkerSpec(f"gpu{i}@{node}", (SHARED_QUEUE, f"{SHARED_QUEUE}.{node}.{i}"), str(i))
            for i in gpus
        ]
    if cpu_workers < 1:
        raise ValueError(f"the number of CPU workers must be >= 1, got {cpu_workers}")
    return [
        WorkerSpec(f"cpu{i}@{node}", (SHARED_QUEUE, f"{SHARED_QUEUE}.{node}.cpu{i}"), "")
        for i in range(cpu_workers)
    ]


def worker_command(spec: WorkerSpec, loglevel: str = "info") -> list[str]:
    """The ``celery worker`` command line of ``spec`` (this interpreter's celery)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "--queues",
        ",".join(spec.queues),
        "--hostname",
        spec.hostname,
        "--loglevel",
        loglevel,
    ]


def farm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ours) with the checkout's root on ``PYTHONPATH``.

    A ``celery -A tasks.app`` subprocess then finds ``celeryconfig`` whatever its current
    folder is.
    """
    env = dict(os.environ if base is None else base)
    root = project_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


def worker_env(spec: WorkerSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of ``spec``'s worker: :func:`farm_env` pinned to its GPU."""
    env = farm_env(base)
    env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
    return env


def project_root() -> Path | None:
    """The folder holding ``celeryconfig.py`` next to the ``tasks`` package, if there is one."""
    spec = importlib.util.find_spec("tasks")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).resolve().parent.parent
    return root if (root / "celeryconfig.py").is_file() else None


def run_workers(specs: Sequence[WorkerSpec], loglevel: str = "info") -> int:
    """Start one worker subprocess per spec and wait for them; return the exit status.

    SIGTERM/SIGINT received here are forwarded as SIGTERM. If a worker exits while no
    shutdown was asked for, the others are stopped too. The status is 0 after a requested
    shutdown in which every worker exited cleanly, else the first non-zero worker status
    (128 + signal number for a worker killed by a signal).
    """
    processes: list[subprocess.Popen] = []
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for spec in specs:
            processes.append(subprocess.Popen(worker_command(spec, loglevel), env=worker_env(spec)))
        while any(p.poll() is None for p in processes):
            if not stopping and any(p.poll() is not None for p in processes):
                exited = [s.hostname for s, p in zip(specs, processes, strict=True) if p.poll()]
                click.echo(f"worker(s) {exited or 'unknown'} exited: stopping the node", err=True)
                stop_all()
            time.sleep(_POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [_status(p.returncode) for p in processes]
    return next((code for code in codes if code != 0), 0)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


# -- fragment affinity -----------------------------------------------------------------------


@dataclass(frozen=True)
class WarmWorker:
    """One worker's advertisement: its own queue and its warm fragments, most recent first."""

    hostname: str
    queue: str | None
    fragments: tuple[str, ...]
    updated_at: float


class WarmRegistry:
    """Which fragments each worker holds warm, in the broker's Redis (see the module doc).

    Args:
        url: a ``redis://`` or ``rediss://`` URL (the broker's).
        ttl_s: how long an advertisement lives unless it is rewritten.

    Example::

        registry = WarmRegistry.for_broker("redis://127.0.0.1:6379/0")
        registry.advertise("gpu0@n1", "gpu.n1.0", ["tiny-sd_0123456789abcdef_01234567"])
        [w.hostname for w in registry.holders("tiny-sd_0123456789abcdef_01234567")]
    """

    def __init__(self, url: str, ttl_s: int = 3600) -> None:
        import redis

        self.ttl_s = int(ttl_s)
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    @classmethod
    def for_broker(cls, url: str, ttl_s: int = 3600) -> WarmRegistry | None:
        """The registry in the broker at ``url``; None when the broker is not Redis."""
        if urlsplit(url).scheme.lower() not in ("redis", "rediss"):
            return None
        return cls(url, ttl_s)

    def advertise(self, hostname: str, queue: str | None, fragments: Sequence[str]) -> None:
        """Record that ``hostname`` (own queue ``queue``) holds ``fragments`` warm."""
        value = {"queue": queue, "fragments": list(fragments), "updated_at": time.time()}
        self._client.set(WARM_KEY_PREFIX + hostname, json.dumps(value), ex=self.ttl_s)

    def forget(self, hostname: str) -> None:
        """Remove ``hostname``'s advertisement (it holds nothing warm)."""
        self._client.delete(WARM_KEY_PREFIX + hostname)

    def workers(self) -> dict[str, WarmWorker]:
        """Every live advertisement, by worker hostname."""
        names = sorted(self._client.scan_iter(match=WARM_KEY_PREFIX + "*", count=500))
        values = self._client.mget(names) if names else []
        out = {}
        for name, raw in zip(names, values, strict=True):
            if raw is None:  # expired between SCAN and MGET
                continue
            hostname = name.decode()[len(WARM_KEY_PREFIX) :]
            data = json.loads(raw)
            out[hostname] = WarmWorker(
                hostname, data.get("queue"), tuple(data["fragments"]), data["updated_at"]
            )
        return out

    def holders(self, key: str) -> list[WarmWorker]:
        """The workers that hold fragment ``key`` warm, most recently used there first."""
        found = [w for w in self.workers().values() if key in w.fragments]
        return sorted(found, key=lambda w: (w.fragments.index(key), w.hostname))

    def waiting(self, queue: str) -> int:
        """How many messages wait in ``queue`` (a Redis list named after the queue)."""
        return int(self._client.llen(queue))

    def close(self) -> None:
        """Close the Redis connections."""
        self._client.close()


@contextlib.contextmanager
def scratch_redis_database(host: str = "127.0.0.1", port: int = 6379) -> Iterator[str]:
    """Yield the URL of an empty Redis database (1-15) of our own; flush it afterwards.

    For tests and benchmarks that need a broker of their own next to other users of the same
    Redis server. A claim key in database 0 (``fragjobs:scratch-db:<n>``, expiring after a
    day) keeps two concurrent users off the same database.

    Raises:
        ConfigError: every database 1-15 holds keys or is claimed.
    """
    import redis

    from fragjobs.errors import ConfigError

    admin = redis.Redis(host, port, db=0, socket_connect_timeout=2)
    token = uuid.uuid4().hex
    try:
        for number in range(1, 16):
            claim = f"{_SCRATCH_CLAIM_PREFIX}{number}"
            database = redis.Redis(host, port, db=number)
            try:
                empty = database.dbsize() == 0
            finally:
                database.close()
            if empty and admin.set(claim, token, nx=True, ex=86400):
                break
        else:
            raise ConfigError(f"no empty, unclaimed Redis database (1-15) on {host}:{port}")
        try:
            yield f"redis://{host}:{port}/{number}"
        finally:
            database = redis.Redis(host, port, db=number)
            database.flushdb()
            database.close()
            if admin.get(claim) == token.encode():
                admin.delete(claim)
    finally:
        admin.close()


# -- commands --------------------------------------------------------------------------------


def _cli_errors(func):
    """The CLI's error handling (``error: <reason>``, exit 2), imported when the command runs."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fragjobs.cli import _fail_cleanly

        return _fail_cleanly(func)(*args, **kwargs)

    return wrapper


def make_celeryconfig_importable() -> None:
    """Put the checkout's root on ``sys.path`` when ``celeryconfig`` is not importable.

    An editable install does not expose the top-level ``celeryconfig`` module; a client run
    from another folder (``fragjobs farm run``) needs it to configure its Celery app.
    """
    root = project_root()
    if root is not None and importlib.util.find_spec("celeryconfig") is None:
        sys.path.insert(0, str(root))


def _farm_app() -> Any:
    """``tasks.app`` with ``celeryconfig`` importable from any current folder."""
    make_celeryconfig_importable()
    from tasks.app import app

    return app


@click.group("farm")
def farm() -> None:
    """Celery workers of the farm (broker, catalog and store from FRAGJOBS_* variables)."""


@farm.command("start")
@click.option("--gpus", default=None, help="Comma-separated GPU indices: one worker per GPU.")
@click.option("--cpu-workers", type=int, default=None, help="Number of workers without a GPU.")
@click.option("--node", default=None, help="Node name in queue and worker names [host name].")
@click.option("--loglevel", default="info", show_default=True)
def start(gpus: str | None, cpu_workers: int | None, node: str | None, loglevel: str) -> None:
    """Run this node's workers in the foreground until SIGTERM/Ctrl-C."""
    try:
        specs = worker_specs(
            node=node or default_node(),
            gpus=parse_gpus(gpus) if gpus is not None else None,
            cpu_workers=cpu_workers,
        )
    except ValueError as exc:
        raise click.UsageError(f"{exc} (use --gpus 0,1 or --cpu-workers N)") from exc
    for spec in specs:
        click.echo(f"starting {spec.hostname} on queues {','.join(spec.queues)}", err=True)
    sys.exit(run_workers(specs, loglevel))


@farm.command("status")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for replies.")
def status(timeout: float) -> None:
    """List the workers that reply: queues, running tasks and warm fragments; queue lengths."""
    app = _farm_app()
    inspect = app.control.inspect(timeout=timeout)
    queues = inspect.active_queues() or {}
    active = inspect.active() or {}
    if not queues:
        click.echo("no worker replied (is `fragjobs farm start` running?)", err=True)
        sys.exit(1)
    settings = FarmSettings()
    registry = WarmRegistry.for_broker(app.conf.broker_url, settings.affinity_ttl_s)
    warm = registry.workers() if registry is not None else {}
    for hostname in sorted(queues):
        names = ",".join(sorted(q["name"] for q in queues[hostname]))
        fragments = ",".join(warm[hostname].fragments) if hostname in warm else "-"
        click.echo(
            f"{hostname}  queues={names}  active={len(active.get(hostname) or [])}  "
            f"warm={fragments or '-'}"
        )
    all_queues = sorted({q["name"] for qs in queues.values() for q in qs})
    if registry is not None:
        for name in all_queues:
            click.echo(f"queue {name}  waiting={registry.waiting(name)}")
        registry.close()


@farm.command("run")
@click.argument("prompt")
@click.option("--variants", default=8, show_default=True, type=int, help="Seed variants.")
@click.option("--model", default="tiny-sd", show_default=True)
@click.option("--batch-size", default=4, show_default=True, type=int, help="Seeds per task.")
@click.option("--threshold", default=0.75, show_default=True, type=float)
@click.option(
    "--fidelity", default=0.9, show_default=True, type=float, help="SSIM the fragment keeps."
)
@click.option("--queue", default=None, help="Send every task to this queue (e.g. gpu.n1.0).")
@click.option("--no-affinity", is_flag=True, help="Never route to a worker's own queue.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds to wait.")
@_cli_errors
def run(
    prompt: str,
    variants: int,
    model: str,
    batch_size: int,
    threshold: float,
    fidelity: float,
    queue: str | None,
    no_affinity: bool,
    timeout: float,
) -> None:
    """Run the chain for PROMPT on the farm with a progress bar; print the images as JSON."""
    from tqdm.auto import tqdm

    from fragjobs.client import Farm

    with Farm() as farm_client:
        job = farm_client.submit(
            prompt,
            variants=variants,
            model=model,
            batch_size=batch_size,
            threshold=threshold,
            fidelity=fidelity,
            queue=queue,
            affinity=not no_affinity,
        )
        deadline = time.monotonic() + timeout
        with tqdm(total=variants, unit="img", desc="farm", file=sys.stderr) as bar:
            while True:
                progress = job.progress()
                bar.update(progress["images_done"] - bar.n)
                stage = next(
                    (n for n, s in progress["stages"].items() if s not in ("SUCCESS",)), None
                )
                bar.set_postfix_str(stage or progress["state"].lower())
                if progress["state"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
                    break
                time.sleep(_POLL_S)
        result = job.wait(timeout=max(1.0, deadline - time.monotonic()))
    if result.used_fallback:
        click.echo(f"full model used: {'; '.join(result.fallback_reasons)}", err=True)
    click.echo(
        json.dumps(
            {
                "fragment_key": result.fragment_key,
                "job_ids": result.job_ids,
                "images": result.image_uris,
                "workers": result.workers,
                "errors": result.errors,
            },
            indent=2,
        )
    )
    sys.exit(1 if result.errors else 0)


def flower_command(port: int = 5555, address: str = "127.0.0.1") -> list[str]:
    """The ``celery -A tasks.app flower`` command line (this interpreter's celery)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "flower",
        f"--port={int(port)}",
        f"--address={address}",
    ]


def flower_env(settings: FarmSettings, base: dict[str, str] | None = None) -> dict[str, str]:
    """Flower's environment: :func:`farm_env` plus ``FLOWER_BASIC_AUTH=user:password``.

    The login travels in the environment, not on the command line, where ``ps`` shows it.

    Raises:
        click.UsageError: ``FRAGJOBS_FLOWER_USER`` / ``FRAGJOBS_FLOWER_PASSWORD`` unset, or
            a value Flower cannot take (``:`` in the user, ``,`` in either).
    """
    user = settings.flower_user
    password = settings.flower_password.get_secret_value() if settings.flower_password else ""
    if not user or not password:
        raise click.UsageError(
            "set FRAGJOBS_FLOWER_USER and FRAGJOBS_FLOWER_PASSWORD: Flower can revoke and "
            "terminate tasks, so fragjobs never starts it without a login"
        )
    if ":" in user or "," in user or "," in password:
        raise click.UsageError(
            "FRAGJOBS_FLOWER_USER may not contain ':' or ',', FRAGJOBS_FLOWER_PASSWORD not ','"
        )
    env = farm_env(base)
    env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    return env


@click.command("flower")
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--address", default="127.0.0.1", show_default=True, help="0.0.0.0: every interface.")
def flower(port: int, address: str) -> None:
    """Start Flower on the farm's broker, with basic auth from FRAGJOBS_FLOWER_USER/PASSWORD.

    Tasks are listed with their names, readable arguments and PROGRESS (step/total); the
    same as ``FLOWER_BASIC_AUTH=user:pw celery -A tasks.app flower``.
    """
    env = flower_env(FarmSettings())
    command = flower_command(port, address)
    os.execve(command[0], command, env)
