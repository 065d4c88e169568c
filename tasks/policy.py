"""What every fragjobs task shares: which failures are retried, and PROGRESS reports.

Only transient failures (catalog database, broker or object store unreachable) are retried,
with exponential backoff (2, 4, 8, ... s, at most 60 s between tries, jittered), at most
:attr:`ChainTask.max_retries` times — several minutes in all, so a database or broker
restart of a minute is ridden out; a constraint violation or a missing row would fail the
same way again and is not retried. Every delivery of a task is counted in the catalog
(:meth:`ChainTask.guard_delivery`): a task that keeps killing its worker fails with the
reason after ``FRAGJOBS_MAX_TASK_ATTEMPTS`` deliveries instead of looping. A redelivered
copy of a generate batch that an earlier delivery of the same task finished is dropped
(:meth:`ChainTask.drop_if_completed`): it completes once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore
from kombu.exceptions import OperationalError as BrokerOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError

from fragjobs.chain.jobs import DEFAULT_MAX_ATTEMPTS, guard_task_delivery
from fragjobs.errors import CatalogError, StorageUnavailableError

log = logging.getLogger("fragjobs.tasks")

FIRST_RESULT_WAIT_S = 30.0
"""How long a redelivered copy of a finished job waits for the first copy's stored result."""


class TransientError(Exception):
    """A failure that retrying later may fix (the catalog database was unreachable).

    The catalog turns every SQLAlchemy error into :class:`~fragjobs.errors.CatalogError`; a
    task re-raises the ones caused by a lost connection as this class, so that
    ``autoretry_for`` retries them and nothing else.
    """


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    DatabaseOperationalError,
    DisconnectionError,
    BrokerOperationalError,
    RedisConnectionError,
    RedisTimeoutError,
    StorageUnavailableError,
)


@contextmanager
def transient_failures() -> Iterator[None]:
    """Re-raise a CatalogError caused by a lost database connection as TransientError."""
    try:
        yield
    except CatalogError as exc:
        if isinstance(exc.__cause__, DatabaseOperationalError | DisconnectionError):
            raise TransientError(str(exc)) from exc
        raise


class ChainTask(Task):
    """The policy shared by the tasks: retry transient failures, report PROGRESS."""

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = 10

    def report_progress(self, step: int, total: int, **meta: Any) -> None:
        """Set the state ``PROGRESS`` with ``{"step", "total", **meta}`` and tell Flower.

        Nothing happens when the task function is called directly (no task id); a task run
        eagerly (``apply``) sends no event.
        """
        if self.request.id is None:
            return
        info = {"step": step, "total": total, **meta}
        self.update_state(state="PROGRESS", meta=info)
        if not self.request.is_eager and self.request.hostname:
            # A custom event type becomes the task's state in Flower (celery.events.state).
            self.send_event("task-progress", result=info)

    def guard_delivery(self, ws: Any) -> None:
        """Count this delivery; raise PoisonTaskError past the attempt limit.

        A retry (``self.request.retries``) is a delivery too, but not a crash: the limit
        grows with the retries, so only deliveries that ended with the worker gone count.
        """
        if self.request.id is not None:
            guard_task_delivery(ws, self.request.id, self.name, self.attempt_limit())

    def drop_if_completed(self, result: dict[str, Any]) -> None:
        """Raise :class:`~celery.exceptions.Ignore` when ``result`` is a redelivered copy's
        (``redelivered``: an earlier delivery finished the job) and that delivery's SUCCESS
        is stored under this task id: the message is acknowledged and nothing is recorded
        again, so the task completes once (no second result, event or callback).

        Celery redelivers an ``acks_late`` message whose acknowledgement could not be made,
        e.g. when the broker restarted while the batch ran; the copy may start while the
        first still runs (it waits for the job's lock). The first copy stores its result
        just after releasing the lock: this waits up to :data:`FIRST_RESULT_WAIT_S` for it.
        If none comes (that worker died after finishing the job), this copy's result stands.
        """
        if not result.get("redelivered") or self.request.id is None:
            return
        deadline = time.monotonic() + (0 if self.request.is_eager else FIRST_RESULT_WAIT_S)
        while self.AsyncResult(self.request.id).state != states.SUCCESS:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.5)
        log.warning(
            "dropped a redelivered copy of task %s: job %s completed with its first delivery",
            self.request.id,
            result.get("job_id"),
        )
        raise Ignore()

    def attempt_limit(self) -> int:
        """Deliveries allowed now: ``FRAGJOBS_MAX_TASK_ATTEMPTS`` plus this task's retries."""
        return max_attempts(self.app) + int(self.request.retries or 0)


def max_attempts(celery_app: Any) -> int:
    """How many deliveries a generation job may have (``fragjobs_max_task_attempts``)."""
    return int(celery_app.conf.get("fragjobs_max_task_attempts") or DEFAULT_MAX_ATTEMPTS)
