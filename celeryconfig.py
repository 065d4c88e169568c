"""Celery settings of the fragjobs farm (DESIGN §5), read from the environment only.

``tasks.app`` loads this module (``app.config_from_object("celeryconfig")``). Nothing here is
specific to one machine: every value comes from a ``FRAGJOBS_*`` variable through
:class:`fragjobs.farm.settings.FarmSettings` (``FRAGJOBS_BROKER_URL``, ``FRAGJOBS_RESULT_BACKEND`` —
default: the broker — and the farm-only ones):

* ``FRAGJOBS_TASK_SOFT_TIME_LIMIT`` (seconds, default 3600): the task gets
  ``SoftTimeLimitExceeded`` and can clean up;
* ``FRAGJOBS_TASK_TIME_LIMIT`` (seconds, default soft limit + 300): the pool process is killed;
* ``FRAGJOBS_MAX_TASK_ATTEMPTS`` (default 3): a generation job delivered more often than this is
  marked failed instead of being run again, so a task that kills its worker (with
  ``task_reject_on_worker_lost`` it is redelivered) does not loop forever;
* ``FRAGJOBS_REVALIDATE_INTERVAL_S`` (default 86400; 0 = no schedule): celery beat sends
  ``fragjobs.revalidate`` this often;
* ``FRAGJOBS_AFFINITY_TTL_S`` (default 3600): lifetime of a worker's warm-fragment
  advertisement (:class:`fragjobs.farm.registry.WarmRegistry`).
"""

from __future__ import annotations

from fragjobs.config import load_settings
from fragjobs.farm.settings import SHARED_QUEUE, FarmSettings

_settings = load_settings(FarmSettings)

broker_url = _settings.broker_url
result_backend = _settings.result_backend or _settings.broker_url
broker_connection_retry_on_startup = True

# JSON only: no pickle anywhere (DESIGN §3); tasks exchange ids, URIs and plain JSON.
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
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
fragjobs_affinity_ttl_s = _settings.affinity_ttl_s

task_soft_time_limit = _settings.task_soft_time_limit
task_time_limit = _settings.task_time_limit
# Redis redelivers a message not acknowledged within visibility_timeout: it must be longer
# than the longest task, or a running task is handed to a second worker. It is also how long
# the tasks of a whole worker that was killed (main process and pool) wait before another
# worker gets them: the hard time limit + REDELIVERY_MARGIN_S (default 960 + 60 s = 17 min),
# plus at most RESTORE_INTERVAL_S, how often the workers look for such messages. kombu
# looks every unacked_restore_interval seconds but by default searches only on every 10th
# look (unacked_restore_throttle), which added up to 100 s (found by the worker-kill drill,
# python -m fragjobs.drills): every look searches here.
# A pool process that dies alone is redelivered at once (task_reject_on_worker_lost).
REDELIVERY_MARGIN_S = 60
RESTORE_INTERVAL_S = 10
broker_transport_options = {
    "visibility_timeout": task_time_limit + REDELIVERY_MARGIN_S,
    "unacked_restore_interval": RESTORE_INTERVAL_S,
    "unacked_restore_throttle": 1,
}

# Ride out a broker restart: publishing the next step of a chain (or a client's submit) is
# retried for about two minutes before it gives up, and the worker keeps reconnecting.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 30,
    "interval_start": 0.5,
    "interval_step": 1.0,
    "interval_max": 5.0,
}
broker_connection_retry = True
broker_connection_max_retries = None
# The result backend (the same Redis) rides it out too: a task storing PROGRESS or its
# result while the broker restarts waits for it (40 tries, backing off up to 10 s apart:
# minutes) instead of failing: a task failing there was retried through a producer the
# outage had broken and rejected for good, its images stored but its job lost (found by the
# Redis-restart drill, python -m fragjobs.drills).
result_backend_always_retry = True
result_backend_max_retries = 40
result_backend_max_sleep_between_retries_ms = 10_000

task_default_queue = SHARED_QUEUE
task_routes = {"fragjobs.*": {"queue": SHARED_QUEUE}}

# Events for Flower: task-sent from clients, task-started/succeeded/... from workers, and the
# tasks' own task-progress events (step, total).
worker_send_task_events = True
task_send_sent_event = True

# Scheduled re-validation. The in-memory scheduler keeps no schedule file: celery's default
# one is a shelve (pickle). A restarted beat therefore waits one full interval; the task's
# lock keeps runs from overlapping whatever the schedule does, and `expires` drops a run
# that could not start before the next one is due.
beat_scheduler = "celery.beat:Scheduler"
beat_schedule = (
    {
        "fragjobs-revalidate": {
            "task": "fragjobs.revalidate",
            "schedule": float(_settings.revalidate_interval_s),
            "options": {"queue": SHARED_QUEUE, "expires": _settings.revalidate_interval_s},
        }
    }
    if _settings.revalidate_interval_s
    else {}
)
