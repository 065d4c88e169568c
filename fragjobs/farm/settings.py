"""The farm's settings and queue names (everything from ``FRAGJOBS_*`` variables)."""

from __future__ import annotations

import os

from pydantic import Field, SecretStr, model_validator

from fragjobs.config import Settings
from fragjobs.errors import ConfigError

SHARED_QUEUE = "gpu"
"""The queue every worker consumes; a worker's own queue is ``gpu.<node>.<i>``."""
PLACEHOLDER_MARK = "change-me"
"""What ``infra/*.env.example`` puts in every secret; a farm refuses to start with one."""


class FarmSettings(Settings):
    """:class:`fragjobs.config.Settings` plus the farm-only ``FRAGJOBS_*`` settings.

    * ``task_soft_time_limit`` (s, default 900): the task gets ``SoftTimeLimitExceeded``;
    * ``task_time_limit`` (s, default soft limit + 60): the pool process is killed; the
      tasks of a whole worker that died are redelivered this + 60 s after they started
      (the workers look for them every 10 s);
    * ``max_task_attempts`` (default 3): a task (profile, extract, validate, revalidate, or a
      generation job) delivered more often than this is failed with the reason instead of
      being run again (a task that keeps killing its worker);
    * ``revalidate_interval_s`` (default 86400, 0 = never): how often celery beat runs
      ``fragjobs.revalidate``;
    * ``affinity_ttl_s`` (default 3600): how long a worker's warm-fragment advertisement
      lives without being refreshed by a generate task;
    * ``flower_user`` / ``flower_password``: the basic-auth login of ``fragjobs flower``.

    Loading them refuses a secret still holding the example files' placeholder
    (:data:`PLACEHOLDER_MARK`): the broker, result backend and catalog URLs, the Flower
    password and the workers' ``AWS_SECRET_ACCESS_KEY``.
    """

    task_soft_time_limit: int = Field(default=900, gt=0)
    task_time_limit: int | None = Field(default=None, gt=0)
    max_task_attempts: int = Field(default=3, gt=0)
    revalidate_interval_s: int = Field(default=86400, ge=0)
    affinity_ttl_s: int = Field(default=3600, gt=0)
    flower_user: str | None = None
    flower_password: SecretStr | None = None

    @model_validator(mode="after")
    def _hard_limit_after_soft(self) -> FarmSettings:
        if self.task_time_limit is None:
            self.task_time_limit = self.task_soft_time_limit + 60
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError(
                "FRAGJOBS_TASK_TIME_LIMIT must be larger than FRAGJOBS_TASK_SOFT_TIME_LIMIT "
                f"(got {self.task_time_limit} <= {self.task_soft_time_limit})"
            )
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> FarmSettings:
        flower_password = self.flower_password.get_secret_value() if self.flower_password else None
        secrets = {
            "FRAGJOBS_BROKER_URL": self.broker_url,
            "FRAGJOBS_RESULT_BACKEND": self.result_backend,
            "FRAGJOBS_DATABASE_URL": self.database_url,
            "FRAGJOBS_FLOWER_PASSWORD": flower_password,
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        }
        placeholders = [
            name for name, value in secrets.items() if value and PLACEHOLDER_MARK in value.lower()
        ]
        if placeholders:
            raise ConfigError(
                f"{', '.join(placeholders)} still hold the placeholder password "
                f"'{PLACEHOLDER_MARK}-...' of the example env file: set a real secret there "
                "(and in the service it logs in to) before starting the farm"
            )
        return self
