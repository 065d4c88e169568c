"""A submitted farm job: its batches, progress and result (:class:`FarmJob`).

:meth:`fragjobs.farm.client.Farm.submit` returns a :class:`FarmJob`, whose task ids (one per
stage, one per generate :class:`Batch`) are assigned before anything is sent. It reads the
tasks' states by polling them (:mod:`fragjobs.farm.results`); :meth:`FarmJob.wait` returns a
:class:`FarmResult`. A broker or result-backend restart is ridden out: states are read
again until the deadline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fragjobs.farm.client import Farm

log = logging.getLogger("fragjobs.client")

_POLL_S = 0.5
_RUNNING_STATES = ("STARTED", "PROGRESS", "RETRY", "SUCCESS")


@dataclass(frozen=True)
class Batch:
    """One generate task: Celery task id, catalog job id, seeds, queue (None: the default)."""

    task_id: str
    job_id: str
    seeds: tuple[int, ...]
    queue: str | None = None


@dataclass
class FarmResult:
    """A finished farm job.

    ``fragment_key`` is the fragment the images were generated with (None when every batch
    fell back to the full model); ``lineage`` follows the catalog from the fragment that was
    used or built (None when there is none); ``errors`` lists batches given up as poison jobs;
    ``used_fallback`` says whether any batch ran on the full model and ``fallback_reasons``
    why (distinct reasons); ``workers`` names the worker of each batch, in order.
    """

    image_uris: list[str]
    fragment_key: str | None
    job_ids: list[str]
    lineage: dict[str, Any] | None
    errors: list[str] = field(default_factory=list)
    used_fallback: bool = False
    fallback_reasons: list[str] = field(default_factory=list)
    workers: list[str | None] = field(default_factory=list)


class FarmJob:
    """A submitted chain: its tasks' ids, its progress and its result."""

    def __init__(
        self,
        farm: Farm,
        stage_task_ids: dict[str, str],
        batches: list[Batch],
        reused_fragment: str | None,
    ) -> None:
        self.farm = farm
        self.stage_task_ids = stage_task_ids
        self.batches = batches
        self.reused_fragment = reused_fragment

    def __repr__(self) -> str:
        return f"FarmJob(jobs={self.job_ids}, reused_fragment={self.reused_fragment!r})"

    @property
    def job_ids(self) -> list[str]:
        """The catalog job ids of the generate batches, in seed order."""
        return [batch.job_id for batch in self.batches]

    def progress(self) -> dict[str, Any]:
        """Where the job is, from the tasks' states (PENDING, STARTED, PROGRESS, ...).

        Returns:
            ``{"state", "stages": {"profile"|"extract"|"validate": state}, "batches":
            [{"job_id", "state", "images_done", "images_total"}], "images_done",
            "images_total"}``; ``state`` is FAILURE if any task failed, SUCCESS when every
            batch finished, PROGRESS once any task started, else PENDING.
        """
        try:
            return self._progress()
        except _broker_errors() as exc:
            log.warning("result backend unreachable (%s)", exc)
            total = sum(len(b.seeds) for b in self.batches)
            return {
                "state": "UNKNOWN",
                "stages": dict.fromkeys(self.stage_task_ids, "UNKNOWN"),
                "batches": [],
                "images_done": 0,
                "images_total": total,
                "error": str(exc),
            }

    def _progress(self) -> dict[str, Any]:
        stages = {name: self._result(tid).state for name, tid in self.stage_task_ids.items()}
        batches = []
        for batch in self.batches:
            result = self._result(batch.task_id)
            state, info = result.state, result.info
            if state == "SUCCESS":
                done = len(batch.seeds)
            elif state == "PROGRESS" and isinstance(info, dict):
                done = int(info.get("step", 0))
            else:
                done = 0
            batches.append(
                {
                    "job_id": batch.job_id,
                    "state": state,
                    "images_done": done,
                    "images_total": len(batch.seeds),
                }
            )
        states = list(stages.values()) + [b["state"] for b in batches]
        if "FAILURE" in states:
            overall = "FAILURE"
        elif all(b["state"] == "SUCCESS" for b in batches):
            overall = "SUCCESS"
        elif any(s in _RUNNING_STATES for s in states):
            overall = "PROGRESS"
        else:
            overall = "PENDING"
        return {
            "state": overall,
            "stages": stages,
            "batches": batches,
            "images_done": sum(b["images_done"] for b in batches),
            "images_total": sum(b["images_total"] for b in batches),
        }

    def wait(self, timeout: float | None = None) -> FarmResult:
        """Block until every batch has finished; return the images and their lineage.

        Raises:
            TimeoutError: not finished after ``timeout`` seconds (the message has the
                progress); the tasks keep running.
            Exception: the error a task failed with (e.g. ``UnknownModelError``), re-raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        task_ids = [*self.stage_task_ids.values(), *(b.task_id for b in self.batches)]
        while True:
            # Results are read by polling their state: .get() would subscribe to the result
            # backend's pub/sub channels for every task. A broker restart is ridden out:
            # the states are read again until the deadline.
            try:
                for task_id in task_ids:
                    self._result(task_id).maybe_throw()
                if all(self._result(b.task_id).successful() for b in self.batches):
                    break
            except _broker_errors() as exc:
                log.warning("result backend unreachable (%s): waiting for it", exc)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"farm job {self.job_ids} not finished after {timeout} s: {self.progress()}"
                )
            time.sleep(_POLL_S)
        outputs = [self._result(b.task_id).result for b in self.batches]
        used = next((o["fragment_key"] for o in outputs if o.get("fragment_key")), None)
        built = self._stage_output("validate") or self._stage_output("extract") or {}
        lineage_key = used or self.reused_fragment or built.get("key")
        reasons = [o["fallback_reason"] for o in outputs if o.get("fallback_reason")]
        return FarmResult(
            image_uris=[uri for output in outputs for uri in output["image_uris"]],
            fragment_key=used,
            job_ids=self.job_ids,
            lineage=self.farm.catalog.lineage(lineage_key) if lineage_key else None,
            errors=[o["error"] for o in outputs if o.get("error")],
            used_fallback=any(o.get("used_fallback") for o in outputs),
            fallback_reasons=list(dict.fromkeys(reasons)),
            workers=[o.get("worker") for o in outputs],
        )

    def _stage_output(self, name: str) -> dict[str, Any] | None:
        task_id = self.stage_task_ids.get(name)
        if task_id is None:
            return None
        result = self._result(task_id)
        return result.result if result.successful() else None

    def _result(self, task_id: str) -> Any:
        return self.farm.app.AsyncResult(task_id)


def _broker_errors() -> tuple[type[BaseException], ...]:
    """What a lost broker or result backend raises (Redis, kombu, sockets)."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (OperationalError, RedisConnectionError, RedisTimeoutError, ConnectionError)
