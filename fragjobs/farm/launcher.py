"""Launch one node's workers: ``fragjobs farm start --gpus 0,1 --node n1`` (DESIGN §5).

One ``celery -A tasks.app worker`` subprocess per GPU, pinned with
``CUDA_VISIBLE_DEVICES=<i>``, with one prefork pool process (``--concurrency 1``), consuming
the shared queue ``gpu`` and its own ``gpu.<node>.<i>`` (hostname ``gpu<i>@<node>``).
``--cpu-workers N`` runs N workers without a GPU (``CUDA_VISIBLE_DEVICES=""``; hostname
``cpu<i>@<node>``, own queue ``gpu.<node>.cpu<i>``); they consume the shared ``gpu`` queue
too, so a CPU-only machine can serve the same chain.

This launcher never imports torch or celery: CUDA is initialised only in the pool processes,
after fork. SIGTERM and SIGINT are forwarded to the workers as SIGTERM (warm shutdown: each
finishes its running task). When a worker exits on its own, the
launcher starts it again (its siblings keep running; a node of one worker keeps running
too); a worker that keeps dying, or refuses to start because ``fragjobs doctor`` found
something it needs broken, stops the node, which exits non-zero for a supervisor to see.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fragjobs.errors import InvalidInputError
from fragjobs.farm.settings import SHARED_QUEUE

NODE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_POLL_S = 0.5


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
        InvalidInputError: anything else.
    """
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InvalidInputError(f"GPU indices are comma-separated integers, got {text!r}") from exc
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise InvalidInputError(f"give distinct non-negative GPU indices, got {text!r}")
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


EXIT_WORKER_REFUSED = 3
"""A worker's exit status when it refuses to start: ``fragjobs doctor`` found something the
farm needs broken (catalog unreachable or out of date, store, broker, device, ...). Starting
it again cannot help, so the node stops with this status."""
RESTART_LIMIT = 5
"""Restarts of one worker within :data:`RESTART_WINDOW_S` before the node gives up."""
RESTART_WINDOW_S = 300.0


def run_workers(specs: Sequence[WorkerSpec], loglevel: str = "info") -> int:
    """Start one worker subprocess per spec, keep them running; return the exit status.

    SIGTERM/SIGINT received here are forwarded as SIGTERM (warm shutdown). A worker that
    exits while no shutdown was asked for (killed, crashed) is started again, with the same
    hostname and queues, without touching its siblings, also when it was the node's only
    worker; one that needs more than :data:`RESTART_LIMIT` restarts within
    :data:`RESTART_WINDOW_S` seconds is left down and the node stops (a supervisor should
    look), as it does at once when a worker refuses to start
    (:data:`EXIT_WORKER_REFUSED`). The status is 0 after a requested shutdown in
    which every worker exited cleanly, else the first non-zero worker status (128 + signal
    number for a worker killed by a signal).
    """
    processes: list[subprocess.Popen] = []
    restarts: list[list[float]] = [[] for _ in specs]
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def start(spec: WorkerSpec) -> subprocess.Popen:
        return subprocess.Popen(worker_command(spec, loglevel), env=worker_env(spec))

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        processes.extend(start(spec) for spec in specs)
        # Until a shutdown is asked for, the node runs even with every worker down (a node of
        # one worker whose worker was killed): each dead worker is started again.
        while not stopping or any(p.poll() is None for p in processes):
            for i, (spec, process) in enumerate(zip(specs, processes, strict=True)):
                if stopping or process.poll() is None:
                    continue
                if process.returncode == EXIT_WORKER_REFUSED:
                    print(
                        f"worker {spec.hostname} refused to start (fragjobs doctor: its log "
                        "says why): stopping the node",
                        file=sys.stderr,
                    )
                    stop_all()
                    break
                now = time.monotonic()
                restarts[i] = [t for t in restarts[i] if now - t < RESTART_WINDOW_S]
                if len(restarts[i]) >= RESTART_LIMIT:
                    print(
                        f"worker {spec.hostname} exited {len(restarts[i]) + 1} times within "
                        f"{RESTART_WINDOW_S:.0f} s: stopping the node",
                        file=sys.stderr,
                    )
                    stop_all()
                    break
                print(
                    f"worker {spec.hostname} exited with status {_status(process.returncode)}:"
                    " starting it again",
                    file=sys.stderr,
                )
                restarts[i].append(now)
                processes[i] = start(spec)
            time.sleep(_POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [_status(p.returncode) for p in processes]
    return next((code for code in codes if code != 0), 0)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


# -- fragment affinity -----------------------------------------------------------------------


def make_celeryconfig_importable() -> None:
    """Put the checkout's root on ``sys.path`` when ``celeryconfig`` is not importable.

    An editable install does not expose the top-level ``celeryconfig`` module; a client run
    from another folder (``fragjobs farm run``) needs it to configure its Celery app.
    """
    root = project_root()
    if root is not None and importlib.util.find_spec("celeryconfig") is None:
        sys.path.insert(0, str(root))
