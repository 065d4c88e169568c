"""The node launcher keeps its workers running: a dead worker is started again, alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fragjobs.farm.launcher import EXIT_WORKER_REFUSED

ROOT = Path(__file__).resolve().parents[2]


def _pids(folder: Path) -> set[int]:
    return {int(p.name) for p in folder.iterdir()}


def _node(folder: Path, workers: int, exit_status: int | None = None) -> subprocess.Popen:
    """A node of stand-in workers (the launcher's own code runs unchanged): each writes its
    pid and exits cleanly on SIGTERM, as a warm-shutdown Celery worker does, or at once with
    ``exit_status``."""
    body = (
        f"sys.exit({exit_status})"
        if exit_status is not None
        else "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(600)"
    )
    script = textwrap.dedent(
        f"""
        import sys
        from fragjobs.farm import launcher

        child = (
            "import os, signal, sys, time; "
            "open(os.path.join({str(folder)!r}, str(os.getpid())), 'w').close(); "
            {body!r}
        )
        launcher.worker_command = lambda spec, loglevel="info": [sys.executable, "-c", child]
        specs = launcher.worker_specs(node="n", cpu_workers={workers})
        sys.exit(launcher.run_workers(specs))
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE)


def _wait_for(folder: Path, count: int, what: str, deadline: float) -> None:
    while len(_pids(folder)) < count:
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_killed_worker_is_restarted_and_its_sibling_keeps_running(tmp_path):
    node = _node(tmp_path, workers=2)
    try:
        deadline = time.monotonic() + 60
        _wait_for(tmp_path, 2, "workers did not start", deadline)
        victim, sibling = sorted(_pids(tmp_path))
        os.kill(victim, signal.SIGKILL)
        _wait_for(tmp_path, 3, "the killed worker was not started again", deadline)
        os.kill(sibling, 0)  # still alive: the node was not stopped
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(timeout=60)
    assert code == 0


def test_the_only_worker_of_a_node_is_restarted_too(tmp_path):
    """Found by the whole-worker-kill drill: a node of one worker used to exit (137)."""
    node = _node(tmp_path, workers=1)
    try:
        deadline = time.monotonic() + 60
        _wait_for(tmp_path, 1, "the worker did not start", deadline)
        [victim] = _pids(tmp_path)
        os.kill(victim, signal.SIGKILL)
        _wait_for(tmp_path, 2, "the node's only worker was not started again", deadline)
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(timeout=60)
    assert code == 0
    assert b"exited with status 137: starting it again" in node.stderr.read()


def test_a_worker_refusing_to_start_stops_the_node_at_once(tmp_path):
    node = _node(tmp_path, workers=1, exit_status=EXIT_WORKER_REFUSED)
    code = node.wait(timeout=60)
    assert code == EXIT_WORKER_REFUSED
    assert len(_pids(tmp_path)) == 1  # not started again: it would refuse again
    assert b"refused to start (fragjobs doctor" in node.stderr.read()
