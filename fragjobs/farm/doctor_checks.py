"""What ``fragjobs doctor`` asks of the farm side: its settings and its broker.

The farm side is the only core code that talks to Redis and Celery, so the doctor's farm
checks live here and are called by :mod:`fragjobs.doctor` only when the farm is in use.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fragjobs.errors import FragjobsError
from fragjobs.logging_setup import redact


def check_farm_settings() -> str:
    """Load :class:`~fragjobs.farm.settings.FarmSettings`; describe the task limits.

    Raises:
        ConfigError: a ``FRAGJOBS_*`` farm setting is invalid or still a placeholder.
    """
    from fragjobs.config import load_settings
    from fragjobs.farm.settings import FarmSettings

    farm = load_settings(FarmSettings)
    return (
        f"task limits {farm.task_soft_time_limit}/{farm.task_time_limit} s, "
        f"{farm.max_task_attempts} attempts per task"
    )


def ping_broker(url: str, timeout_s: float = 3.0) -> str:
    """Connect to the broker at ``url`` within ``timeout_s``; describe what answered.

    Redis is asked for ``PING`` and its version; any other broker gets a kombu connection.

    Raises:
        FragjobsError: the broker is unreachable, refuses the login, or does not answer in
            time (one line, credentials masked).
    """
    shown = redact(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss"):
        import redis

        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        try:
            client.ping()
            version = client.info("server").get("redis_version", "?")
        except redis.RedisError as exc:
            raise FragjobsError(f"broker {shown} does not answer: {exc}") from exc
        finally:
            client.close()
        return f"{shown} answers (Redis {version})"
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout_s) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:  # kombu raises the transport's own types
        raise FragjobsError(f"broker {shown} does not answer: {exc}") from exc
    return f"{shown} answers"
