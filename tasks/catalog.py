"""Catalog maintenance tasks: scheduled re-validation and a cheap status query (DESIGN §5).

* ``fragjobs.revalidate`` — :func:`fragjobs.chain.revalidate` on the worker: re-hash the
  stored objects of every ready fragment, re-run its quality gate, mark ``corrupt`` /
  ``failed_gate``. celery beat sends it every ``FRAGJOBS_REVALIDATE_INTERVAL_S`` seconds
  (``celeryconfig.beat_schedule``); the core's lock keeps two runs from overlapping, and a
  run that finds it taken returns ``{"skipped": "..."}``.
* ``fragjobs.fragment_status`` — a fragment's catalog status (no model is loaded: the
  farm's cheapest round trip, used to measure dispatch latency).
"""

from __future__ import annotations

import time
from typing import Any

from fragjobs import chain
from tasks.app import app
from tasks.policy import ChainTask, transient_failures


@app.task(bind=True, base=ChainTask, name="fragjobs.revalidate")
def revalidate(
    self: ChainTask, *, keys: list[str] | None = None, gate: bool = True
) -> dict[str, Any]:
    """Re-validate every ready fragment (or ``keys``); return the report as JSON.

    PROGRESS is reported after each fragment (``{"step", "total", "key"}``).
    """
    with transient_failures():
        ws = chain.workspace()
        self.guard_delivery(ws)
        report = chain.revalidate(
            ws,
            keys=keys,
            gate=gate,
            progress_callback=lambda done, total, key: self.report_progress(done, total, key=key),
        )
    return {**report.to_dict(), "worker": self.request.hostname}


@app.task(bind=True, base=ChainTask, name="fragjobs.fragment_status")
def fragment_status(self: ChainTask, key: str) -> dict[str, Any]:
    """The catalog status of fragment ``key``, with the worker and when it was read.

    ``checked_at`` is the worker's ``time.time()`` when the task started, so a client on the
    same clock can measure how long the message took to reach a worker.
    """
    started = time.time()
    with transient_failures():
        result = chain.fragment_status_message(key, ws=chain.workspace())
    return {**result, "worker": self.request.hostname, "checked_at": started}
