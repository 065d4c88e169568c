"""The chain's Celery tasks: adapters over :mod:`fragjobs.chain.delivery` (DESIGN §5).

Each task takes ids, URIs and plain JSON, makes one call into the core and returns its JSON
dict, adding the ``worker`` (Celery hostname) that produced it. The previous step's dict is
the next step's first argument, so ``profile | extract | validate | group(generate, ...)`` is
a plain Celery chain (built by :class:`fragjobs.farm.client.Farm`); the chain's knobs
(:class:`~fragjobs.chain.knobs.ChainKnobs` as JSON) travel with the messages. What a step
decides (idempotence, the gate ladder, the poison guard) lives in the core.

After every task the worker advertises the base models it holds (loaded, and in its node's
base cache) for routing and ``fragjobs models ls`` (:func:`tasks.worker.advertise_warm_bases`).

While it runs, a task reports ``PROGRESS`` (``{"step", "total", ...}``) to the result backend
and as a ``task-progress`` event, which Flower shows. Retry policy: :mod:`tasks.policy`.
"""

from __future__ import annotations

import logging
from typing import Any

from fragjobs import chain
from tasks.app import app
from tasks.policy import ChainTask, TransientError, transient_failures
from tasks.worker import advertise_warm_bases, advertise_warm_fragments

log = logging.getLogger("fragjobs.tasks")

__all__ = ["TransientError", "extract", "generate", "profile", "validate"]


@app.task(bind=True, base=ChainTask, name="fragjobs.profile")
def profile(self: ChainTask, prompt: str, *, knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Profile ``prompt`` (:func:`fragjobs.chain.delivery.profile_message`)."""
    self.report_progress(0, 1, stage="profile")
    with transient_failures():
        ws = chain.workspace()
        self.guard_delivery(ws)
        result = chain.profile_message(prompt, knobs, ws=ws)
    advertise_warm_bases()
    return {**result, "worker": self.request.hostname}


@app.task(bind=True, base=ChainTask, name="fragjobs.extract")
def extract(
    self: ChainTask, upstream: dict[str, Any] | str, *, knobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Extract a profile's fragment (:func:`fragjobs.chain.delivery.extract_message`)."""
    self.report_progress(0, 1, stage="extract")
    with transient_failures():
        ws = chain.workspace()
        self.guard_delivery(ws)
        result = chain.extract_message(upstream, knobs, ws=ws)
    advertise_warm_bases()
    return {**result, "worker": self.request.hostname}


@app.task(bind=True, base=ChainTask, name="fragjobs.validate")
def validate(
    self: ChainTask, upstream: dict[str, Any] | str, *, seeds: list[int] | None = None
) -> dict[str, Any]:
    """Gate a fragment, climbing the ladder (:func:`fragjobs.chain.delivery.validate_message`)."""
    self.report_progress(0, 1, stage="validate")
    with transient_failures():
        ws = chain.workspace()
        self.guard_delivery(ws)
        result = chain.validate_message(upstream, seeds, ws=ws)
    advertise_warm_bases()
    return {**result, "worker": self.request.hostname}


@app.task(bind=True, base=ChainTask, name="fragjobs.generate")
def generate(
    self: ChainTask,
    upstream: dict[str, Any] | str | None = None,
    *,
    prompt: str,
    seeds: list[int],
    job_id: str,
    model: str | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Generate one batch as job ``job_id`` (:func:`fragjobs.chain.delivery.generate_message`).

    After the batch the worker advertises the fragments it holds warm (affinity).
    """
    with transient_failures():
        result = chain.generate_message(
            upstream,
            prompt=prompt,
            seeds=seeds,
            job_id=job_id,
            model=model,
            batch_size=batch_size,
            max_attempts=self.attempt_limit(),
            ws=chain.workspace(),
            progress_callback=lambda done, total: self.report_progress(
                done, total, job_id=job_id, worker=self.request.hostname
            ),
        )
    self.drop_if_completed(result)
    advertise_warm_fragments()
    advertise_warm_bases()
    return {**result, "worker": self.request.hostname}
