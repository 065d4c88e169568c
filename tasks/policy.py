"""What every fragjobs task shares: which failures are retried, and PROGRESS reports.

Only transient failures (catalog database, broker or object store unreachable) are retried,
with exponential backoff, at most :attr:`ChainTask.max_retries` times; a constraint
violation or a missing row would fail the same way again and is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError as BrokerOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError

from fragjobs.chain.jobs import DEFAULT_MAX_ATTEMPTS
from fragjobs.errors import CatalogError, StorageUnavailableError


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
    retry_backoff = True
    retry_backoff_max = 600
    retry_jitter = True
    max_retries = 3

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


def max_attempts(celery_app: Any) -> int:
    """How many deliveries a generation job may have (``fragjobs_max_task_attempts``)."""
    return int(celery_app.conf.get("fragjobs_max_task_attempts") or DEFAULT_MAX_ATTEMPTS)
