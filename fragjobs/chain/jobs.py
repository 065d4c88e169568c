"""Generation job rows and the poison guard, for the embedded run and the farm alike.

A farm task is delivered at least once: a worker that dies mid-task gets its message
redelivered (``task_reject_on_worker_lost``). A job that keeps killing its worker would loop
forever, so every delivery is counted in the job's catalog row (``attempts``) and past the
limit the job is marked failed with the reason instead of being run again; what it stored
before stays.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fragjobs.catalog import JobEntity
from fragjobs.chain.bases import base
from fragjobs.chain.workspaces import Workspace
from fragjobs.errors import NotFoundError, PoisonTaskError

DEFAULT_MAX_ATTEMPTS = 3
"""Deliveries a job may have unless ``FRAGJOBS_MAX_TASK_ATTEMPTS`` says otherwise."""


def ensure_job(
    ws: Workspace, job_id: str, prompt: str, seeds: list[int], model: str | None
) -> JobEntity:
    """The job row ``job_id``, created (with its base model row) on first use.

    The job row needs the base model's catalog id, so the first call loads the base.
    """
    try:
        return ws.catalog.get_job(job_id)
    except NotFoundError:
        pass
    info = base(model, ws.settings).info
    base_row = ws.catalog.get_or_create_base_model(info.name, info.sha256, info.source)
    job, _ = ws.catalog.create_job(job_id, base_row.id, prompt.strip(), seeds, None)
    return job


def count_delivery(
    ws: Workspace, job_id: str, prompt: str, seeds: list[int], model: str | None
) -> int:
    """Count one delivery of job ``job_id`` (creating its row first); return the count.

    A crash while loading the base on the first delivery is not counted (that delivery has
    no row yet); every later delivery is counted before anything else runs.
    """
    try:
        return ws.catalog.increment_job_attempts(job_id)
    except NotFoundError:
        ensure_job(ws, job_id, prompt, seeds, model)
        return ws.catalog.increment_job_attempts(job_id)


def give_up_if_poison(ws: Workspace, job_id: str, attempts: int, limit: int) -> str | None:
    """Past ``limit`` deliveries: mark the job failed and return why; else None."""
    if attempts <= limit:
        return None
    reason = (
        f"generation job {job_id} was delivered {attempts} times (limit {limit}, "
        "FRAGJOBS_MAX_TASK_ATTEMPTS): marked failed instead of running it again; "
        "look at the worker logs for what killed the earlier attempts"
    )
    ws.catalog.update_job(job_id, status="failed", finished_at=datetime.now(UTC))
    return reason


def guard_task_delivery(ws: Workspace, task_id: str, name: str, limit: int) -> None:
    """Count one delivery of farm task ``task_id``; past ``limit`` refuse to run it again.

    Raises:
        PoisonTaskError: the task was delivered more than ``limit`` times (it keeps killing
            its worker); what it produced before stays.
    """
    attempts = ws.catalog.count_task_delivery(task_id, name)
    if attempts > limit:
        raise PoisonTaskError(
            f"task {name} {task_id} was delivered {attempts} times (limit {limit}, "
            "FRAGJOBS_MAX_TASK_ATTEMPTS): failed instead of running it again; look at the "
            "worker logs for what killed the earlier attempts"
        )
