"""Follow the drill's jobs to the end and check what they left behind.

A job (one :meth:`fragjobs.client.Farm.submit`) is

* **completed** when every batch finished with an image per seed, each recorded once in
  the catalog, stored once, with the bytes the catalog recorded, and its row ``done``;
* **lost** when it did not finish in time, failed, was given up as a poison job, or lacks
  an image (row or object) of one of its seeds;
* **duplicated** when a batch has more image rows or objects than seeds, or completed twice:
  its generate task succeeded more than once (the workers' logs) or its row was finished
  again after the job had been seen done (``finished_at`` moved).

Anything else that is wrong (an image object that does not match its row, a row left
``running``) is a *problem*: it is reported and misses the targets too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fragjobs.keys import generation_object

POLL_S = 0.5


@dataclass
class TrackedJob:
    """One submitted farm job, followed until it finished or time ran out.

    ``done_at``/``submitted_at`` are ``time.monotonic()`` values; ``failure`` says why the
    job is lost; ``finished_at`` holds each batch row's ``finished_at`` when it was checked.
    """

    job: Any
    prompt: str
    seeds: list[int]
    submitted_at: float
    done_at: float | None = None
    result: Any = None
    failure: str | None = None
    completed: bool = False
    lost: bool = False
    duplicated: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    finished_at: dict[str, datetime | None] = field(default_factory=dict)
    last_error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether following it is over (done or given up)."""
        return self.done_at is not None or self.failure is not None

    @property
    def task_ids(self) -> list[str]:
        """The generate tasks' ids (one per batch)."""
        return [batch.task_id for batch in self.job.batches]


def submit(
    farm: Any,
    prompt: str,
    seeds: list[int],
    knobs: dict[str, Any],
    *,
    batch_size: int,
    pipeline_batch_size: int = 2,
    affinity: bool = True,
) -> TrackedJob:
    """Submit ``prompt`` for ``seeds`` in batches of ``batch_size``; start following it."""
    job = farm.submit(
        prompt,
        seeds=list(seeds),
        batch_size=batch_size,
        pipeline_batch_size=pipeline_batch_size,
        affinity=affinity,
        **knobs,
    )
    return TrackedJob(job, prompt, list(seeds), time.monotonic())


def follow(jobs: list[TrackedJob], timeout: float) -> None:
    """Poll every unfinished job until it finished or ``timeout`` seconds have passed.

    A job seen ``SUCCESS`` gets its result (``done_at`` is when it was seen); one seen
    ``FAILURE`` is lost with the task's error. An unreachable broker, result backend or
    catalog is waited out (the farm is expected to ride out such outages).
    """
    deadline = time.monotonic() + timeout
    while True:
        for tracked in (t for t in jobs if not t.finished):
            state = tracked.job.progress()["state"]
            if state == "SUCCESS":
                try:
                    tracked.result = tracked.job.wait(timeout=10)
                except TimeoutError:
                    continue
                except Exception as exc:  # noqa: BLE001 (the catalog may be down: look again)
                    tracked.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                tracked.done_at = time.monotonic()
            elif state == "FAILURE":
                try:
                    tracked.job.wait(timeout=10)
                    tracked.failure = "a task failed"
                except Exception as exc:  # noqa: BLE001 (the task's own error, re-raised)
                    tracked.failure = f"a task failed: {type(exc).__name__}: {exc}"[:300]
        if all(t.finished for t in jobs) or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    for tracked in (t for t in jobs if not t.finished):
        why = tracked.last_error or tracked.job.progress()
        tracked.failure = f"not finished after {timeout:.0f} s: {why}"[:300]


def check(farm: Any, store: Any, tracked: TrackedJob) -> None:
    """Decide whether ``tracked`` completed, was lost or duplicated (see the module doc)."""
    tracked.completed = tracked.lost = False
    if tracked.failure is not None:
        tracked.lost = True
        return
    result = tracked.result
    if result.errors:
        tracked.failure = f"given up: {'; '.join(result.errors)}"[:300]
        tracked.lost = True
        return
    catalog = farm.catalog
    missing: list[str] = []
    for batch in tracked.job.batches:
        row = catalog.get_job(batch.job_id)
        tracked.finished_at[batch.job_id] = row.finished_at
        if row.status != "done":
            tracked.problems.append(f"job {batch.job_id} is {row.status}, its task succeeded")
        seeds = list(batch.seeds)
        rows = [image.seed for image in catalog.list_images(batch.job_id)]
        objects = _stored_seeds(store, batch.job_id)
        missing += [f"{batch.job_id}/{s}" for s in seeds if s not in rows or s not in objects]
        extra_rows = len(rows) - len(set(rows)) + len(set(rows) - set(seeds))
        extra_objects = len(set(objects) - set(seeds))
        if extra_rows or extra_objects:
            tracked.duplicated.append(
                f"job {batch.job_id}: {len(rows)} image rows and {len(objects)} objects "
                f"for {len(seeds)} seeds"
            )
        for image in catalog.list_images(batch.job_id):
            name = generation_object(batch.job_id, f"{image.seed}.png")
            try:
                store.get_bytes(name, image.sha256)
            except Exception as exc:  # noqa: BLE001 (reported, not raised)
                tracked.problems.append(f"{name} does not match its row: {exc}"[:300])
    if missing:
        tracked.failure = f"images missing: {', '.join(missing[:4])}"
        tracked.lost = True
        return
    tracked.completed = True


def recheck_completed_twice(farm: Any, tracked: TrackedJob, succeeded: dict[str, int]) -> list[str]:
    """Batches of ``tracked`` newly seen completed twice (also recorded on it).

    ``succeeded``: how often each task id succeeded (:meth:`DrillFarm.task_runs`).
    """
    found = []
    for batch in tracked.job.batches:
        if any(batch.job_id in reason for reason in tracked.duplicated):
            continue
        runs = succeeded.get(batch.task_id, 0)
        before = tracked.finished_at.get(batch.job_id)
        after = farm.catalog.get_job(batch.job_id).finished_at
        if runs > 1 or (before is not None and after != before):
            found.append(
                f"job {batch.job_id} completed twice (its task succeeded {runs} times, "
                f"finished_at {before} -> {after})"
            )
    tracked.duplicated += found
    return found


def _stored_seeds(store: Any, job_id: str) -> list[int]:
    """The seeds of the PNG objects stored under ``generations/<job_id>/``."""
    prefix = generation_object(job_id, "x")[:-1]
    names = [name[len(prefix) :] for name in store.list(prefix)]
    return [int(name[:-4]) for name in names if name.endswith(".png") and name[:-4].isdigit()]
