"""Celery settings of the fragjobs farm (DESIGN §5), read from the environment only.

``tasks.app`` loads this module (``app.config_from_object("celeryconfig")``). Nothing here is
specific to one machine: every value comes from a ``FRAGJOBS_*`` variable through
:class:`fragjobs.config.Settings` (``FRAGJOBS_BROKER_URL``, ``FRAGJOBS_RESULT_BACKEND`` —
default: the broker), plus three farm-only ones:

* ``FRAGJOBS_TASK_SOFT_TIME_LIMIT`` (seconds, default 3600): the task gets
  ``SoftTimeLimitExceeded`` and can clean up;
* ``FRAGJOBS_TASK_TIME_LIMIT`` (seconds, default soft limit + 300): the pool process is killed;
* ``FRAGJOBS_MAX_TASK_ATTEMPTS`` (default 3): a generation job delivered more often than this is
  marked failed instead of being run again, so a task that kills its worker (with
  ``task_reject_on_worker_lost`` it is redelivered) does not loop forever.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from fragjobs.config import Settings
from fragjobs.farm import SHARED_QUEUE


class FarmSettings(Settings):
    """:class:`fragjobs.config.Settings` plus the farm's time limits and attempt limit."""

    task_soft_time_limit: int = Field(default=3600, gt=0)
    task_time_limit: int | None = Field(default=None, gt=0)
    max_task_attempts: int = Field(default=3, gt=0)

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


_settings = FarmSettings()

broker_url = _settings.broker_url
result_backend = _settings.result_backend or _settings.broker_url
broker_connection_retry_on_startup = True

# JSON only: no pickle anywhere (DESIGN §3); tasks exchange ids, URIs and plain JSON.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
result_extended = True

# A task is acknowledged when it has finished, one message at a time per worker process, and
# requeued when its worker dies; the catalog's attempt counter stops a poison task.
task_acks_late = True
worker_prefetch_multiplier = 1
task_reject_on_worker_lost = True
task_track_started = True
fragjobs_max_task_attempts = _settings.max_task_attempts

task_soft_time_limit = _settings.task_soft_time_limit
task_time_limit = _settings.task_time_limit
# Redis redelivers a message not acknowledged within visibility_timeout: it must be longer
# than the longest task, or a running task is handed to a second worker.
broker_transport_options = {"visibility_timeout": task_time_limit + 600}

task_default_queue = SHARED_QUEUE
task_routes = {"fragjobs.*": {"queue": SHARED_QUEUE}}

# Events for Flower: task-sent from clients, task-started/succeeded/... from workers.
worker_send_task_events = True
task_send_sent_event = True
