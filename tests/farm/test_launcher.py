"""The node launcher keeps its workers running: a dead worker is started again, alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pids(folder: Path) -> set[int]:
    return {int(p.name) for p in folder.iterdir()}


def test_a_killed_worker_is_restarted_and_its_sibling_keeps_running(tmp_path):
    # Stand-in workers (the launcher's own code runs unchanged): each writes its pid and
    # exits cleanly on SIGTERM, as a warm-shutdown Celery worker does.
    script = textwrap.dedent(
        f"""
        import sys
        from fragjobs.farm import launcher

        child = (
            "import os, signal, sys, time; "
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').close(); "
            "time.sleep(600)"
        )
        launcher.worker_command = lambda spec, loglevel="info": [sys.executable, "-c", child]
        specs = launcher.worker_specs(node="n", cpu_workers=2)
        sys.exit(launcher.run_workers(specs))
        """
    )
    node = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while len(_pids(tmp_path)) < 2:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        victim, sibling = sorted(_pids(tmp_path))
        os.kill(victim, signal.SIGKILL)
        while len(_pids(tmp_path)) < 3:
            assert time.monotonic() < deadline, "the killed worker was not started again"
            time.sleep(0.2)
        os.kill(sibling, 0)  # still alive: the node was not stopped
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(timeout=60)
    assert code == 0
