"""The chain's Celery tasks: thin adapters over :mod:`fragjobs.chain` (DESIGN §5).

Each task takes ids, URIs and plain JSON, re-reads state from the catalog, calls the core and
returns a JSON dict of ids and URIs. The previous step's dict is the next step's first
argument, so ``profile | extract | validate | group(generate, ...)`` is a plain Celery chain
(built by :mod:`fragjobs.client`)::

    profile("a red circle", model="tiny-sd")  -> {"profile_id", "base_model_id", ...}
    extract({"profile_id": ...}, threshold=0.75, fidelity=0.9) -> {"key", "storage_uri", ...}
    validate({"key": ...})                     -> {"key", "passed", "status", ...}
    generate({"key": ...}, prompt=..., seeds=[0, 1], job_id=...) -> {"job_id", "image_uris", ...}

Every result also names the ``worker`` (Celery hostname) that produced it.

Every task is idempotent (``task_acks_late`` may run it twice): the core's steps find the rows
and objects they already wrote; ``validate`` returns the recorded verdict of a fragment that
was already validated (a ``corrupt`` one is not validated again: it must be rebuilt);
``generate`` keeps the images a previous delivery stored.

While it runs, a task reports ``PROGRESS`` (``{"step", "total", ...}``) to the result backend
(:meth:`FarmJob.progress <fragjobs.client.FarmJob.progress>`) and as a ``task-progress`` event,
which Flower shows as the task's state and result until it finishes.

Retries: only transient failures (catalog database, broker or object store unreachable) are
retried, with exponential backoff, at most three times. A generation job counts its
deliveries in the catalog (``attempts``); past ``fragjobs_max_task_attempts`` it is marked
failed and an error result is returned instead of running it again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError as BrokerOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError

from fragjobs import chain
from fragjobs.errors import (
    CatalogError,
    FragmentError,
    InvalidInputError,
    NotFoundError,
    StorageUnavailableError,
)
from fragjobs.keys import normalise_prompt, validate_key
from tasks.app import app
from tasks.worker import advertise_warm_fragments

log = logging.getLogger("fragjobs.tasks")

DEFAULT_MAX_ATTEMPTS = 3
VALIDATED_STATUSES = ("ready", "failed_gate")
# extract's knobs, returned in its result so that validate can rebuild the config
EXTRACT_KNOBS = ("threshold", "low_rank", "int8", "fidelity")


class TransientError(Exception):
    """A failure that retrying later may fix (the catalog database was unreachable).

    The catalog turns every SQLAlchemy error into :class:`~fragjobs.errors.CatalogError`; a
    task re-raises the ones caused by a lost connection as this class, so that
    ``autoretry_for`` retries them and nothing else (a constraint violation or a missing row
    would fail the same way again).
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
    """The policy shared by the chain's tasks: retry transient failures, report PROGRESS."""

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


def _field(upstream: Any, name: str) -> str:
    """``upstream[name]`` of the previous task's result, or ``upstream`` itself if a string."""
    value = upstream.get(name) if isinstance(upstream, dict) else upstream
    if not isinstance(value, str):
        raise InvalidInputError(
            f"expected the previous step's result with a {name!r} (or the {name} itself), "
            f"got {upstream!r}"
        )
    return value


@app.task(bind=True, base=ChainTask, name="fragjobs.profile")
def profile(
    self: ChainTask,
    prompt: str,
    *,
    model: str | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """Profile ``prompt`` on ``model``; return the stored profile's id and URIs."""
    self.report_progress(0, 1, stage="profile")
    with transient_failures():
        result = chain.profile(
            prompt,
            model=model,
            seeds=seeds if seeds is not None else chain.DEFAULT_PROFILE_SEEDS,
            steps=steps,
            ws=chain.workspace(),
            progress=False,
        )
    return {
        "profile_id": result.profile_id,
        "base_model_id": result.base_model_id,
        "stats_uri": result.stats_uri,
        "importance_uri": result.importance_uri,
        "reused": result.reused,
        "worker": self.request.hostname,
    }


@app.task(bind=True, base=ChainTask, name="fragjobs.extract")
def extract(
    self: ChainTask,
    upstream: dict[str, Any] | str,
    *,
    threshold: float = 0.75,
    model: str | None = None,
    low_rank: bool = True,
    int8: bool = True,
    fidelity: float = 0.9,
) -> dict[str, Any]:
    """Extract the fragment of a stored profile (``upstream``: profile's result or its id).

    ``fidelity``: the SSIM against the full model the fragment keeps on the profiling seeds
    (:func:`fragjobs.chain.extraction_config`). The result carries the knobs (``config``)
    and ``model``, so that ``validate`` can extract a more conservative fragment if this one
    fails its gate.
    """
    profile_id = validate_key(_field(upstream, "profile_id"))
    self.report_progress(0, 1, stage="extract", profile_id=profile_id)
    knobs = {"threshold": threshold, "low_rank": low_rank, "int8": int8, "fidelity": fidelity}
    config = chain.extraction_config(**knobs)
    with transient_failures():
        result = chain.extract(profile_id, config, ws=chain.workspace(), model=model)
    return {
        "key": result.key,
        "profile_id": profile_id,
        "storage_uri": result.storage_uri,
        "reused": result.reused,
        "config": knobs,
        "model": model,
        "worker": self.request.hostname,
    }


@app.task(bind=True, base=ChainTask, name="fragjobs.validate")
def validate(
    self: ChainTask, upstream: dict[str, Any] | str, *, seeds: list[int] | None = None
) -> dict[str, Any]:
    """Gate a fragment against its full model (``upstream``: extract's result or the key).

    When ``upstream`` is extract's result (it carries ``profile_id`` and ``config``) and the
    fragment fails, the core's ladder extracts more conservative fragments
    (:func:`fragjobs.chain.extract_and_validate`, at most ``GATE_ATTEMPTS`` in all); the
    result then names the last one (``key``) and lists every attempt (``attempts``).
    A fragment that was validated already returns its recorded verdict (a redelivered task
    whose first fragment failed does not climb the ladder again). A fragment that
    cannot be read (corrupt, manifest unreadable) does not fail the chain: the result says
    so (``status: corrupt``) and generation falls back to the full model. A fragment marked
    corrupt stays so (a node's warm cache may still hold good bytes, but the store does not):
    ``fragjobs revalidate --key`` restores it once its objects are repaired.
    """
    key = validate_key(_field(upstream, "key"))
    self.report_progress(0, 1, stage="validate", key=key)
    with transient_failures():
        ws = chain.workspace()
        row = ws.catalog.get_fragment(key)
        latest = ws.catalog.latest_validation(key)
        if row.status in VALIDATED_STATUSES and latest is not None:
            return _verdict(self, key, row.status, latest.passed, latest.id, reused=True)
        if row.status == "corrupt":
            latest_id = latest.id if latest is not None else None
            verdict = _verdict(self, key, row.status, False, latest_id, reused=True)
            return {**verdict, "error": f"fragment {key} is corrupt: {row.status_reason}"}
        seeds = seeds if seeds is not None else list(chain.DEFAULT_VALIDATION_SEEDS)
        attempts = None
        try:
            val = chain.validate(key, seeds=seeds, ws=ws, progress=False)
            ladder = _ladder(upstream)
            if not val.passed and ladder is not None:
                profile_id, config, model = ladder
                ext, val, attempts = chain.extract_and_validate(
                    profile_id,
                    config,
                    seeds=seeds,
                    ws=ws,
                    model=model,
                    progress=False,
                    validated=val,
                )
                key = ext.key
        except FragmentError as exc:
            log.warning("fragment %s cannot be validated: %s", key, exc)
            status = ws.catalog.get_fragment(key).status
            return {**_verdict(self, key, status, False, None, reused=False), "error": str(exc)}
        row = ws.catalog.get_fragment(key)
        latest = ws.catalog.latest_validation(key)
    verdict = _verdict(self, key, row.status, latest.passed, latest.id, reused=False)
    return verdict if attempts is None else {**verdict, "attempts": attempts}


def _ladder(upstream: dict[str, Any] | str) -> tuple[str, Any, str | None] | None:
    """(profile id, extraction config, model) from extract's result, or None (a bare key)."""
    if not isinstance(upstream, dict) or "profile_id" not in upstream or "config" not in upstream:
        return None
    knobs = upstream["config"]
    if not isinstance(knobs, dict):
        raise InvalidInputError(f"config must be extract's knobs (a dict), got {knobs!r}")
    config = chain.extraction_config(**{k: knobs[k] for k in EXTRACT_KNOBS if k in knobs})
    return validate_key(upstream["profile_id"]), config, upstream.get("model")


def _verdict(
    task: ChainTask,
    key: str,
    status: str,
    passed: bool,
    validation_id: int | None,
    *,
    reused: bool,
) -> dict[str, Any]:
    return {
        "key": key,
        "status": status,
        "passed": passed,
        "validation_id": validation_id,
        "reused": reused,
        "worker": task.request.hostname,
    }


@app.task(bind=True, base=ChainTask, name="fragjobs.generate")
def generate(
    self: ChainTask,
    upstream: dict[str, Any] | str | None = None,
    *,
    prompt: str,
    seeds: list[int],
    job_id: str,
    model: str | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Generate one batch of seed variants as catalog job ``job_id``.

    ``upstream`` names the fragment to use (validate's result, ``{"key": ...}`` or the key);
    None uses the prompt's ready fragment if there is one. An unusable fragment falls back to
    the full model (``used_fallback``, ``fallback_reason``). ``batch_size`` is how many images
    one pipeline call makes (PROGRESS is reported after each call).

    Returns the job id, image URIs, the fragment key used, ``error`` (None, or why a poison
    job was given up), the ``worker``, where the fragment came from (``fragment_source``:
    ``memory`` — this process held it warm —, ``node cache``, ``store`` or None) and what
    the node's warm cache did for this batch (``warm_cache``: hits, misses, fetched bytes).
    After the batch the worker advertises the fragments it holds warm (affinity).
    """
    key = _field(upstream, "key") if upstream is not None else None
    normalise_prompt(prompt)
    validate_key(job_id)
    with transient_failures():
        ws = chain.workspace()
        attempts = _count_attempt(ws, job_id, prompt, seeds, model)
        limit = max_attempts(self.app)
        if attempts > limit:
            reason = (
                f"generation job {job_id} was delivered {attempts} times (limit {limit}, "
                "FRAGJOBS_MAX_TASK_ATTEMPTS): marked failed instead of running it again; "
                "look at the worker logs for what killed the earlier attempts"
            )
            log.error(reason)
            ws.catalog.update_job(job_id, status="failed", finished_at=datetime.now(UTC))
            return _generation(job_id, seeds, [], None, False, None, error=reason)
        warm_before = set(chain.warm_fragment_keys())
        cache = chain.warm_cache(ws)
        counters = _cache_counters(cache)
        result = chain.generate(
            prompt,
            seeds=seeds,
            model=model,
            key=key,
            batch_size=batch_size,
            job_id=job_id,
            ws=ws,
            progress=False,
            progress_callback=lambda done, total: self.report_progress(
                done, total, job_id=job_id, worker=self.request.hostname
            ),
        )
        if result.fragment_key is not None:
            # The job row was created before the fragment was chosen: link it for lineage.
            ws.catalog.update_job(job_id, fragment_key=result.fragment_key)
    fetched = {k: v - counters[k] for k, v in _cache_counters(cache).items()}
    if result.fragment_key is None:
        source = None
    elif result.fragment_key in warm_before:
        source = "memory"
    else:
        source = "store" if cache is None or fetched["misses"] else "node cache"
    advertise_warm_fragments()
    return {
        **_generation(
            job_id,
            result.seeds,
            result.image_uris,
            result.fragment_key,
            result.used_fallback,
            result.fallback_reason,
        ),
        "worker": self.request.hostname,
        "fragment_source": source,
        "warm_cache": fetched,
    }


def _cache_counters(cache: Any) -> dict[str, int]:
    if cache is None:
        return {"hits": 0, "misses": 0, "fetched_bytes": 0}
    return {"hits": cache.hits, "misses": cache.misses, "fetched_bytes": cache.fetched_bytes}


def _count_attempt(
    ws: chain.Workspace, job_id: str, prompt: str, seeds: list[int], model: str | None
) -> int:
    """Count this delivery of job ``job_id``; the first one creates the job row.

    The job row needs the base model's catalog id, so the first delivery loads the base
    before it is counted: a crash while loading the base is not counted (that delivery has
    no row yet); every later delivery is counted before anything else runs.
    """
    try:
        return ws.catalog.increment_job_attempts(job_id)
    except NotFoundError:
        pass
    info = chain.base(model, ws.settings).info
    base_row = ws.catalog.get_or_create_base_model(info.name, info.sha256, info.source)
    ws.catalog.create_job(job_id, base_row.id, prompt.strip(), seeds, None)
    return ws.catalog.increment_job_attempts(job_id)


def _generation(
    job_id: str,
    seeds: list[int],
    image_uris: list[str],
    fragment_key: str | None,
    used_fallback: bool,
    fallback_reason: str | None,
    *,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "seeds": list(seeds),
        "image_uris": list(image_uris),
        "fragment_key": fragment_key,
        "used_fallback": used_fallback,
        "fallback_reason": fallback_reason,
        "error": error,
    }
