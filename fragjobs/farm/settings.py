"""The farm's settings and queue names (everything from ``FRAGJOBS_*`` variables)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from fragjobs.config import Settings

SHARED_QUEUE = "gpu"
"""The queue every worker consumes; a worker's own queue is ``gpu.<node>.<i>``."""


class FarmSettings(Settings):
    """:class:`fragjobs.config.Settings` plus the farm-only ``FRAGJOBS_*`` settings.

    * ``task_soft_time_limit`` (s, default 3600): the task gets ``SoftTimeLimitExceeded``;
    * ``task_time_limit`` (s, default soft limit + 300): the pool process is killed;
    * ``max_task_attempts`` (default 3): a generation job delivered more often than this is
      marked failed instead of being run again (a task that keeps killing its worker);
    * ``revalidate_interval_s`` (default 86400, 0 = never): how often celery beat runs
      ``fragjobs.revalidate``;
    * ``affinity_ttl_s`` (default 3600): how long a worker's warm-fragment advertisement
      lives without being refreshed by a generate task;
    * ``flower_user`` / ``flower_password``: the basic-auth login of ``fragjobs flower``.
    """

    task_soft_time_limit: int = Field(default=3600, gt=0)
    task_time_limit: int | None = Field(default=None, gt=0)
    max_task_attempts: int = Field(default=3, gt=0)
    revalidate_interval_s: int = Field(default=86400, ge=0)
    affinity_ttl_s: int = Field(default=3600, gt=0)
    flower_user: str | None = None
    flower_password: SecretStr | None = None

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
