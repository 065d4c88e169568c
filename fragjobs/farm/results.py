"""The client's result backend: Redis, read by polling, never through pub/sub.

:class:`fragjobs.farm.jobs.FarmJob` reads its tasks' states by polling them. Celery's Redis
backend also subscribes to a channel per task, as each task is sent and as each group is
built, and that subscription gives up after about 20 s of broker outage ("Retry limit
exceeded ... The Celery application must be restarted"): a job submitted while the broker
restarted failed although publishing it is retried for two minutes (found by the
Redis-restart drill, ``python -m fragjobs.drills``). :class:`PollingRedisBackend` is the same
backend with Celery's polling mixin (that of its other key-value backends): nothing is
subscribed, and ``AsyncResult.get()`` polls the result's key.

Celery imports this module by name (:func:`result_backend_url`), only in a client.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery.backends.base import SyncBackendMixin
from celery.backends.redis import RedisBackend


class PollingRedisBackend(SyncBackendMixin, RedisBackend):
    """:class:`celery.backends.redis.RedisBackend` read by polling (see the module doc)."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Nothing: a sent task's result is polled, not subscribed to."""


def result_backend_url(url: str) -> str:
    """The client's ``result_backend`` setting for ``url``: a Redis URL is read through
    :class:`PollingRedisBackend`; any other backend is left as it is."""
    if urlsplit(url).scheme.lower() in ("redis", "rediss"):
        return f"{__name__}:{PollingRedisBackend.__name__}+{url}"
    return url
