"""The drills: one function per fault, each running one trial on a :class:`DrillFarm`.

Every drill submits jobs with :meth:`fragjobs.client.Farm.submit`, injects its fault, follows
the jobs to the end (:mod:`fragjobs.drills.tracking`) and returns a :class:`TrialResult`.
Recovery is measured from the fault (the kill, the service's return, the damage) to the
moment every job it touched had completed; for the damage drills, to the first job that used
the repaired fragment again.

* ``malformed`` — 30 malformed specs: each must be refused by ``Farm.submit`` with a fragjobs
  error before anything reaches the broker (no key of the broker's database appears or
  changes, no worker receives a task).
* ``concurrent`` — four identical jobs of a new prompt at once: all complete, on one profile
  and one fragment, with store and catalog agreeing.
* ``pool-kill`` — SIGKILL the pool process running a generate batch: redelivered at once.
* ``worker-kill`` — SIGKILL a worker's main and pool processes: the node's launcher starts it
  again, the batch is redelivered after the visibility timeout (time limit + 60 s).
* ``redis-restart`` / ``postgres-restart`` — stop the service for ``outage_s`` while batches
  run (and, for Redis, submit a job while it is down), then start it on the same port.
* ``flipped-byte`` / ``deleted-object`` — damage a ready fragment's stored object behind the
  store's back; a job runs, re-validation (``fragjobs.revalidate``, sent as celery beat
  would) marks the fragment, and the next job's chain rebuilds it in place.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fragjobs.drills.cluster import DrillFarm
from fragjobs.drills.report import TrialResult
from fragjobs.drills.tracking import (
    TrackedJob,
    check,
    follow,
    recheck_completed_twice,
    submit,
)
from fragjobs.errors import FragjobsError
from fragjobs.keys import FRAGMENT_FILE, MANIFEST_FILE, fragment_object, normalise_prompt

PROGRESS_TIMEOUT_S = 180.0
"""How long a drill waits for a batch to be half-way before injecting its fault."""
JOB_TIMEOUT_S = 300.0
"""How long a job may take once its fault is over (more for redelivery after a kill)."""
ACK_SETTLE_S = 3.0
"""How long a finished task's acknowledgement may take to reach the broker."""
STRAY_MARGIN_S = 30.0
"""How long past the visibility timeout a drill waits for a stray message's redelivery."""
BROKER_SETTLE_S = 2.0
"""How long the malformed drill waits for a stray message to reach a worker."""
VALIDATED = ("ready", "failed_gate")
TRANSIENT_BROKER_KEYS = ("unacked_mutex",)
"""Broker keys kombu sets and deletes on its own while workers restore unacked messages."""


@dataclass
class DrillContext:
    """What the drills share: the farm, the outage length, the prompt with a ready fragment."""

    farm: DrillFarm
    outage_s: float
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    ready_prompt: str | None = None
    builds: int = 0

    @property
    def knobs(self) -> dict[str, Any]:
        """The knobs of every job (:meth:`DrillSettings.knobs`)."""
        return self.farm.settings.knobs()

    def ready(self) -> tuple[str, Any]:
        """A prompt and its ready fragment; a chain builds one when there is none."""
        if self.ready_prompt is not None:
            row = self._ready_row(self.ready_prompt)
            if row is not None:
                return self.ready_prompt, row
        self.builds += 1
        prompt = f"drill base {self.run_id} {self.builds}"
        tracked = submit(self.farm.farm, prompt, [0, 1], self.knobs, batch_size=2)
        follow([tracked], JOB_TIMEOUT_S)
        row = self._ready_row(prompt)
        if tracked.failure is not None or row is None:
            raise RuntimeError(
                f"no ready fragment for {prompt!r} to drill on: {tracked.failure or 'gate failed'}"
            )
        self.ready_prompt = prompt
        return prompt, row

    def _ready_row(self, prompt: str) -> Any:
        wanted = normalise_prompt(prompt)
        rows = [
            f
            for f in self.farm.farm.catalog.list_fragments(status="ready")
            if normalise_prompt(f.prompt) == wanted
        ]
        return rows[0] if rows else None


def _result(name: str, trial: int, jobs: list[TrackedJob]) -> TrialResult:
    result = TrialResult(name, trial)
    result.jobs = jobs
    return result


def _settle(ctx: DrillContext, result: TrialResult, timeout: float) -> None:
    """Follow the trial's jobs to the end, check them, and count them.

    A finished job whose message is still unacknowledged (its acknowledgement was lost, say
    in a broker outage) will be handed out again after the visibility timeout: the trial
    waits for that delivery (received again and acknowledged, or run to the end) and counts
    a second completion as a duplicate.
    """
    farm = ctx.farm
    follow(result.jobs, timeout)
    for tracked in result.jobs:
        check(farm.farm, farm.store, tracked)
    ours = {task_id for tracked in result.jobs for task_id in tracked.task_ids}
    stray = ours & farm.unacked_task_ids()
    if stray:  # an acknowledgement on its way is gone in a moment; a lost one stays
        time.sleep(ACK_SETTLE_S)
        stray &= farm.unacked_task_ids()
    if stray:
        result.notes.append(f"{len(stray)} finished task(s) left unacknowledged")
        received_before, before = farm.task_runs()
        deadline = time.monotonic() + farm.redelivery_s + STRAY_MARGIN_S
        while time.monotonic() < deadline:
            received, succeeded = farm.task_runs()
            unacked = farm.unacked_task_ids()
            if all(
                succeeded.get(t, 0) > before.get(t, 0)
                or (received.get(t, 0) > received_before.get(t, 0) and t not in unacked)
                for t in stray
            ):
                break  # each was handed out again and ran to the end, or was dropped
            time.sleep(2)
        left = stray & farm.unacked_task_ids()
        if left:
            result.problems.append(f"{len(left)} task(s) still unacknowledged: {sorted(left)}")
        _, succeeded = farm.task_runs()
        for tracked in result.jobs:
            if tracked.completed:
                recheck_completed_twice(farm.farm, tracked, succeeded)
    result.count()


def _wait_for_progress(ctx: DrillContext, tracked: TrackedJob, step: int) -> tuple[str, str]:
    """(worker, task id) of a batch of ``tracked`` that reported at least ``step`` images.

    Raises:
        RuntimeError: no batch got that far within :data:`PROGRESS_TIMEOUT_S`.
    """
    app = ctx.farm.farm.app
    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while time.monotonic() < deadline:
        for batch in tracked.job.batches:
            state = app.AsyncResult(batch.task_id)
            info = state.info if state.state == "PROGRESS" else None
            if isinstance(info, dict) and info.get("step", 0) >= step and info.get("worker"):
                return info["worker"], batch.task_id
        time.sleep(0.1)
    raise RuntimeError(f"no batch reached {step} images within {PROGRESS_TIMEOUT_S:.0f} s")


# -- kills -----------------------------------------------------------------------------------


def pool_kill(ctx: DrillContext, trial: int) -> TrialResult:
    """SIGKILL the pool process running a batch half-way; it must complete elsewhere."""
    prompt, _ = ctx.ready()
    tracked = submit(
        ctx.farm.farm, prompt, list(range(16)), ctx.knobs, batch_size=16, affinity=False
    )
    result = _result("pool-kill", trial, [tracked])
    victim, task_id = _wait_for_progress(ctx, tracked, 4)
    pid = ctx.farm.task_pid(victim, task_id)
    if pid is None:
        result.problems.append("the batch finished before its pool process could be killed")
        _settle(ctx, result, JOB_TIMEOUT_S)
        return result
    os.kill(pid, signal.SIGKILL)
    fault = time.monotonic()
    _settle(ctx, result, JOB_TIMEOUT_S)
    if tracked.completed:
        result.recovery_s = tracked.done_at - fault
    attempts = ctx.farm.farm.catalog.get_job(tracked.job.job_ids[0]).attempts
    result.notes.append(f"killed pool process {pid} of {victim}; job delivered {attempts}x")
    return result


def worker_kill(ctx: DrillContext, trial: int) -> TrialResult:
    """SIGKILL a worker's main and pool processes half-way through a batch.

    The node's launcher starts the worker again; the batch's message is handed out again
    once the visibility timeout (time limit + 60 s) has passed since its delivery.
    """
    prompt, _ = ctx.ready()
    tracked = submit(
        ctx.farm.farm, prompt, list(range(16)), ctx.knobs, batch_size=16, affinity=False
    )
    result = _result("worker-kill", trial, [tracked])
    victim, _ = _wait_for_progress(ctx, tracked, 4)
    main, pool = ctx.farm.worker_processes(victim)
    for pid in (main, *pool):
        os.kill(pid, signal.SIGKILL)
    fault = time.monotonic()
    back = _wait_for_new_worker(ctx, victim, main)
    redelivery = ctx.farm.redelivery_s
    _settle(ctx, result, redelivery + JOB_TIMEOUT_S)
    if tracked.completed:
        result.recovery_s = tracked.done_at - fault
    result.notes.append(
        f"killed {victim} (main {main}, pool {pool}); "
        + (f"launcher restarted it in {back:.0f} s; " if back is not None else "not restarted; ")
        + f"visibility timeout {redelivery:.0f} s"
    )
    if back is None:
        result.problems.append(f"the launcher did not start {victim} again")
    return result


def _wait_for_new_worker(ctx: DrillContext, hostname: str, old_pid: int) -> float | None:
    """Seconds until ``hostname`` answers again with another main process (None: never)."""
    started = time.monotonic()
    while time.monotonic() - started < 180:
        try:
            main, _ = ctx.farm.worker_processes(hostname)
        except Exception:  # noqa: BLE001 (not up yet)
            main = None
        if main is not None and main != old_pid:
            return time.monotonic() - started
        time.sleep(1)
    return None


# -- outages ---------------------------------------------------------------------------------


def redis_restart(ctx: DrillContext, trial: int) -> TrialResult:
    """Stop Redis for ``outage_s`` while batches run and one job is being submitted."""
    submitted_during: dict[str, Any] = {}

    def submit_while_down(prompt: str) -> None:
        from fragjobs.client import Farm

        started = time.monotonic()
        try:
            with Farm(ctx.farm.farm.settings) as other:
                tracked = submit(other, prompt, list(range(6)), ctx.knobs, batch_size=6)
                tracked.job.farm = ctx.farm.farm  # followed with the drill's own client
            submitted_during["job"] = tracked
        except Exception as exc:  # noqa: BLE001 (reported)
            submitted_during["error"] = f"{type(exc).__name__}: {exc}"[:300]
        submitted_during["seconds"] = time.monotonic() - started

    return _outage(
        ctx,
        "redis-restart",
        trial,
        ctx.farm.redis.stop,
        ctx.farm.redis.start,
        during=submit_while_down,
        submitted_during=submitted_during,
    )


def postgres_restart(ctx: DrillContext, trial: int) -> TrialResult:
    """Stop PostgreSQL for ``outage_s`` (``pg_ctl stop -m fast``) while batches run."""
    postgres = ctx.farm.postgres
    return _outage(ctx, "postgres-restart", trial, postgres.stop, postgres.start)


def _outage(
    ctx: DrillContext,
    name: str,
    trial: int,
    stop: Callable[[], None],
    start: Callable[[], None],
    *,
    during: Callable[[str], None] | None = None,
    submitted_during: dict[str, Any] | None = None,
) -> TrialResult:
    prompt, _ = ctx.ready()
    jobs = [
        submit(ctx.farm.farm, prompt, list(range(12)), ctx.knobs, batch_size=6) for _ in range(2)
    ]
    result = _result(name, trial, jobs)
    _wait_for_progress(ctx, jobs[0], 2)
    down = time.monotonic()
    stop()
    helper = None
    if during is not None:
        time.sleep(min(2.0, ctx.outage_s / 4))
        helper = threading.Thread(target=during, args=(prompt,), daemon=True)
        helper.start()
    time.sleep(max(0.0, ctx.outage_s - (time.monotonic() - down)))
    start()
    back = time.monotonic()
    result.notes.append(f"down {back - down:.0f} s")
    if helper is not None:
        helper.join(timeout=300)
        if "job" in submitted_during:
            jobs.append(submitted_during["job"])
            result.notes.append(
                f"a job submitted while down was queued after {submitted_during['seconds']:.0f} s"
            )
        else:
            result.problems.append(
                f"submitting while down failed: {submitted_during.get('error', 'no answer')}"
            )
    _settle(ctx, result, ctx.farm.redelivery_s + JOB_TIMEOUT_S)
    done = [t.done_at for t in jobs if t.completed]
    if done and len(done) == len(jobs):
        result.recovery_s = max(0.0, max(done) - back)
    return result


# -- damage ----------------------------------------------------------------------------------


def flipped_byte(ctx: DrillContext, trial: int) -> TrialResult:
    """Flip one byte of a ready fragment's file in the store (its recorded sha256 kept)."""

    def damage(key: str, name: str, sha256: str) -> str:
        farm = ctx.farm
        data = bytearray(farm.s3.get_object(Bucket=farm.bucket, Key=f"farm/{name}")["Body"].read())
        data[len(data) // 2] ^= 0xFF
        farm.s3.put_object(
            Bucket=farm.bucket, Key=f"farm/{name}", Body=bytes(data), Metadata={"sha256": sha256}
        )
        return f"flipped byte {len(data) // 2} of {name}"

    return _damage(ctx, "flipped-byte", trial, FRAGMENT_FILE, damage)


def deleted_object(ctx: DrillContext, trial: int) -> TrialResult:
    """Delete a ready fragment's file (odd trials) or manifest (even trials) from the store."""

    def damage(key: str, name: str, sha256: str) -> str:
        ctx.farm.s3.delete_object(Bucket=ctx.farm.bucket, Key=f"farm/{name}")
        return f"deleted {name}"

    filename = FRAGMENT_FILE if trial % 2 else MANIFEST_FILE
    return _damage(ctx, "deleted-object", trial, filename, damage)


def _damage(
    ctx: DrillContext,
    name: str,
    trial: int,
    filename: str,
    damage: Callable[[str, str, str], str],
) -> TrialResult:
    farm, catalog = ctx.farm.farm, ctx.farm.farm.catalog
    prompt, row = ctx.ready()
    key = row.key
    object_name = fragment_object(key.split("_", 1)[0], key, filename)
    sha256 = row.file_sha256 if filename == FRAGMENT_FILE else row.manifest_sha256
    result = _result(name, trial, [])
    result.notes.append(damage(key, object_name, sha256))
    fault = time.monotonic()

    first = submit(farm, prompt, list(range(4)), ctx.knobs, batch_size=2)
    result.jobs.append(first)
    follow([first], JOB_TIMEOUT_S)
    if first.result is not None:
        used = "fragment" if first.result.fragment_key else "full model"
        result.notes.append(f"next job: {used}")
    report = farm.app.send_task("fragjobs.revalidate", kwargs={"keys": [key]}).get(
        timeout=JOB_TIMEOUT_S
    )
    status = catalog.get_fragment(key).status
    result.notes.append(f"revalidate: {status}")
    if status == "ready" and not report.get("skipped"):
        result.problems.append(f"re-validation did not see the damage to {object_name}")

    repaired = submit(farm, prompt, list(range(4)), ctx.knobs, batch_size=2)
    result.jobs.append(repaired)
    _settle(ctx, result, JOB_TIMEOUT_S)
    row = catalog.get_fragment(key)
    whole = _whole(ctx, key, row)
    used_it = repaired.completed and repaired.result.fragment_key == key
    if used_it and row.status == "ready" and whole:
        result.recovery_s = repaired.done_at - fault
        result.notes.append("rebuilt in place")
    else:
        result.notes.append(f"not repaired: {row.status}, objects whole: {whole}")
    return result


def _whole(ctx: DrillContext, key: str, row: Any) -> bool:
    """Whether the fragment's file and manifest in the store match the catalog's sha256."""
    base = key.split("_", 1)[0]
    try:
        ctx.farm.store.get_bytes(fragment_object(base, key, FRAGMENT_FILE), row.file_sha256)
        ctx.farm.store.get_bytes(fragment_object(base, key, MANIFEST_FILE), row.manifest_sha256)
    except FragjobsError:
        return False
    return True


# -- concurrency -----------------------------------------------------------------------------


def concurrent(ctx: DrillContext, trial: int) -> TrialResult:
    """Four identical jobs of a new prompt at once: one profile, one fragment, all complete."""
    farm, catalog, store = ctx.farm.farm, ctx.farm.farm.catalog, ctx.farm.store
    prompt = f"drill concurrent {ctx.run_id} {trial}"
    jobs = [submit(farm, prompt, [0, 1], ctx.knobs, batch_size=2) for _ in range(4)]
    result = _result("concurrent", trial, jobs)
    _settle(ctx, result, 2 * JOB_TIMEOUT_S)
    done = [t for t in jobs if t.completed]
    used = {t.result.fragment_key for t in done}
    fallbacks = sorted({r for t in done for r in t.result.fallback_reasons})
    if fallbacks:
        result.problems.append(f"fell back to the full model: {'; '.join(fallbacks)}"[:300])
    wanted = normalise_prompt(prompt)
    fragments = [f for f in catalog.list_fragments() if normalise_prompt(f.prompt) == wanted]
    profiles = sorted({f.profile_id for f in fragments})
    stored_profiles = sorted({name.split("/")[1] for name in store.list("profiles/")})
    prompt_part = profiles[0].split("_")[1] if profiles else None
    mine = [p for p in stored_profiles if prompt_part and p.split("_")[1] == prompt_part]
    if len(used) > 1 or len(profiles) > 1 or len(mine) > 1:
        result.duplicated += 1
        result.duplicated_reasons.append(
            f"{len(used)} fragments used, {len(profiles)} profiles in the catalog, "
            f"{len(mine)} profiles stored for one prompt"
        )
    for fragment in fragments:
        if fragment.status == "building":
            result.problems.append(f"fragment {fragment.key} left building")
        elif fragment.status in VALIDATED and not _whole(ctx, fragment.key, fragment):
            result.problems.append(f"store and catalog disagree on fragment {fragment.key}")
    for profile_id in profiles:
        profile = catalog.get_profile(profile_id)
        name = profile.stats_uri[len(store.url) + 1 :]
        try:
            store.get_bytes(name, profile.stats_sha256)
        except FragjobsError as exc:
            result.problems.append(f"store and catalog disagree on profile {profile_id}: {exc}")
    if any(f.status == "ready" for f in fragments):
        ctx.ready_prompt = prompt
    keys = ", ".join(sorted(k for k in used if k)) or "none"
    result.notes.append(f"fragment used: {keys}; {len(fragments)} fragment row(s)")
    return result


# -- malformed specs -------------------------------------------------------------------------


def malformed_specs(not_a_model: str) -> list[tuple[str, dict[str, Any]]]:
    """30 malformed job specs (what is wrong, the arguments that differ from a good one)."""
    return [
        ("empty prompt", {"prompt": ""}),
        ("blank prompt", {"prompt": "   \t"}),
        ("prompt not a string", {"prompt": 3}),
        ("prompt None", {"prompt": None}),
        ("NUL byte in the prompt", {"prompt": "a red\x00 circle"}),
        ("lone surrogate in the prompt", {"prompt": "a red \ud800 circle"}),
        ("escape character in the prompt", {"prompt": "a red \x1b[31m circle"}),
        ("100,000-character prompt", {"prompt": "x" * 100_000}),
        ("variants 0", {"variants": 0}),
        ("variants -1", {"variants": -1}),
        ("variants as text", {"variants": "4"}),
        ("variants True", {"variants": True}),
        ("variants 2.5", {"variants": 2.5}),
        ("variants over the limit", {"variants": 10_001}),
        ("repeated seeds", {"seeds": [1, 1]}),
        ("negative seed", {"seeds": [-1]}),
        ("seeds as text", {"seeds": "0,1"}),
        ("no seeds", {"seeds": []}),
        ("seeds as a dict", {"seeds": {1: 2}}),
        ("batch_size 0", {"batch_size": 0}),
        ("pipeline_batch_size 0", {"pipeline_batch_size": 0}),
        ("threshold 1.5", {"threshold": 1.5}),
        ("threshold NaN", {"threshold": math.nan}),
        ("steps 0", {"steps": 0}),
        ("unknown model", {"model": "no-such-model"}),
        ("missing model folder", {"model": "/no/such/folder"}),
        ("a folder that is not a model", {"model": not_a_model}),
        ("affinity 'no'", {"affinity": "no"}),
        ("queue name with a space", {"queue": "gpu n1"}),
        ("unknown knob", {"colour": "red"}),
    ]


def malformed(ctx: DrillContext, trial: int) -> TrialResult:
    """Each malformed spec is refused by ``Farm.submit`` before anything reaches the broker."""
    farm = ctx.farm
    result = _result("malformed", trial, [])
    specs = malformed_specs(str(farm.folder))
    result.submitted, result.refused, result.queued = len(specs), 0, 0
    received_before = sum(farm.task_runs()[0].values())
    before = farm.broker_snapshot()
    base = {"prompt": f"a malformed drill {trial}", "variants": 2, **ctx.knobs}
    for what, spec in specs:
        try:
            farm.farm.submit(**{**base, **spec})
        except FragjobsError:
            result.refused += 1
        except Exception as exc:  # noqa: BLE001 (refused, but not with a fragjobs error)
            result.refused += 1
            result.problems.append(f"{what}: refused with {type(exc).__name__}: {exc}"[:200])
        else:
            result.problems.append(f"{what}: accepted")
        changed = _changed_keys(before, farm.broker_snapshot())
        if changed:
            result.queued += 1
            result.problems.append(f"{what}: the broker changed ({', '.join(changed[:3])})")
            before = farm.broker_snapshot()
    if result.queued == 0:  # a message seen by no snapshot may still have reached a worker
        time.sleep(BROKER_SETTLE_S)
        received = sum(farm.task_runs()[0].values()) - received_before
        late = _changed_keys(before, farm.broker_snapshot())
        if received or late:
            result.problems.append(f"workers received {received} task(s); keys changed: {late[:3]}")
            result.queued = 1
    result.notes.append(f"{result.refused} of {len(specs)} refused by Farm.submit")
    return result


def _changed_keys(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(
        name
        for name, size in after.items()
        if name not in TRANSIENT_BROKER_KEYS and before.get(name) != size
    )


DRILLS: dict[str, Callable[[DrillContext, int], TrialResult]] = {
    "malformed": malformed,
    "concurrent": concurrent,
    "pool-kill": pool_kill,
    "worker-kill": worker_kill,
    "redis-restart": redis_restart,
    "postgres-restart": postgres_restart,
    "flipped-byte": flipped_byte,
    "deleted-object": deleted_object,
}
"""Every drill, in the order they run (the malformed specs on an idle farm first)."""
