"""The chain's steps as messages: JSON in, JSON out, safe to deliver twice.

The farm's Celery tasks are adapters over these functions (one call each); everything a
step decides lives here, in the core, so that the farm and the embedded run agree. A step's
result dict is the next step's first argument (``upstream``)::

    profile_message(prompt, knobs)   -> {"profile_id", "base_model_id", "stats_uri", ..., "knobs"}
    extract_message(upstream)        -> {"key", "profile_id", "storage_uri", "reused", "knobs"}
    validate_message(upstream)       -> {"key", "status", "passed", "validation_id", "reused"}
    generate_message(upstream, prompt=..., seeds=[...], job_id=...) -> {"job_id", "image_uris", ...}

``knobs`` is :meth:`ChainKnobs.to_json`; it travels with the messages, so a knob set on the
command line reaches every step. Every step is idempotent (a redelivered message finds the
rows and objects already written): ``validate_message`` returns the recorded verdict of a
fragment validated already; ``generate_message`` keeps the images of an earlier delivery and
counts deliveries (:mod:`fragjobs.chain.jobs`). ``generate_message`` delivers the full
model's images the chain kept in the store (its profiling and validation seeds,
:mod:`fragjobs.chain.full_images`) for those of its seeds that have one, instead of
generating them; the client chooses which seeds a batch asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fragjobs.chain.extract_step import extract
from fragjobs.chain.generate_step import generate
from fragjobs.chain.jobs import DEFAULT_MAX_ATTEMPTS, count_delivery, give_up_if_poison
from fragjobs.chain.knobs import DEFAULT_VALIDATION_SEEDS, ChainKnobs
from fragjobs.chain.ladder import extract_and_validate
from fragjobs.chain.locks import write_lock
from fragjobs.chain.profile_step import profile
from fragjobs.chain.reuse import measure_reuse
from fragjobs.chain.state import warm_fragment_keys
from fragjobs.chain.validate_step import validate
from fragjobs.chain.workspaces import Workspace, warm_cache, workspace
from fragjobs.errors import FragmentError, InvalidInputError
from fragjobs.keys import check_seeds, normalise_prompt, validate_key

log = logging.getLogger("fragjobs")

VALIDATED_STATUSES = ("ready", "failed_gate")
"""Statuses whose recorded verdict a redelivered validate returns instead of validating."""


def upstream_field(upstream: Any, name: str) -> str:
    """``upstream[name]`` of the previous step's result, or ``upstream`` itself if a string."""
    value = upstream.get(name) if isinstance(upstream, dict) else upstream
    if not isinstance(value, str):
        raise InvalidInputError(
            f"expected the previous step's result with a {name!r} (or the {name} itself), "
            f"got {upstream!r}"
        )
    return value


def message_knobs(upstream: Any, knobs: dict[str, Any] | None, ws: Workspace) -> ChainKnobs:
    """The knobs given, else those the previous step passed on, else the settings'."""
    if knobs is None and isinstance(upstream, dict):
        knobs = upstream.get("knobs")
    return ChainKnobs.from_json(knobs or {}, ws.settings)


def profile_message(
    prompt: str, knobs: dict[str, Any] | None = None, *, ws: Workspace | None = None
) -> dict[str, Any]:
    """Profile ``prompt`` with ``knobs`` (model, profile seeds, steps)."""
    ws = ws or workspace()
    normalise_prompt(prompt)
    chosen = message_knobs(None, knobs, ws)
    result = profile(
        prompt,
        model=chosen.model,
        seeds=chosen.profile_seeds,
        steps=chosen.steps,
        ws=ws,
        progress=False,
    )
    return {
        "profile_id": result.profile_id,
        "base_model_id": result.base_model_id,
        "stats_uri": result.stats_uri,
        "importance_uri": result.importance_uri,
        "reused": result.reused,
        "knobs": chosen.to_json(),
    }


def extract_message(
    upstream: dict[str, Any] | str,
    knobs: dict[str, Any] | None = None,
    *,
    ws: Workspace | None = None,
) -> dict[str, Any]:
    """Extract the fragment of a stored profile (``upstream``: profile's result or its id)."""
    ws = ws or workspace()
    profile_id = validate_key(upstream_field(upstream, "profile_id"))
    chosen = message_knobs(upstream, knobs, ws)
    result = extract(profile_id, chosen.extraction_config(), ws=ws, model=chosen.model)
    return {
        "key": result.key,
        "profile_id": profile_id,
        "storage_uri": result.storage_uri,
        "reused": result.reused,
        "knobs": chosen.to_json(),
    }


def validate_message(
    upstream: dict[str, Any] | str,
    seeds: list[int] | None = None,
    *,
    ws: Workspace | None = None,
) -> dict[str, Any]:
    """Gate a fragment against its full model (``upstream``: extract's result or the key).

    When ``upstream`` is extract's result (it carries ``profile_id`` and ``knobs``) and the
    fragment fails, the gate ladder (:mod:`fragjobs.chain.ladder`) extracts more conservative
    fragments; the result then names the last one (``key``) and lists every attempt
    (``attempts``). Paraphrases in the knobs are measured on a fragment that passed
    (``reuse``). A fragment validated already returns its recorded verdict (a redelivered
    message whose first fragment failed does not climb the ladder again). A fragment that
    cannot be read (corrupt, manifest unreadable) does not fail the chain: the result says
    so (``status: corrupt``, ``error``) and generation falls back to the full model; it stays
    corrupt until ``fragjobs revalidate --key`` finds its objects whole again.
    """
    ws = ws or workspace()
    key = validate_key(upstream_field(upstream, "key"))
    row = ws.catalog.get_fragment(key)
    latest = ws.catalog.latest_validation(key)
    if row.status in VALIDATED_STATUSES and latest is not None:
        return _verdict(key, row.status, latest.passed, latest.id, reused=True)
    if row.status == "corrupt":
        verdict = _verdict(key, row.status, False, latest.id if latest else None, reused=True)
        return {**verdict, "error": f"fragment {key} is corrupt: {row.status_reason}"}
    ladder = isinstance(upstream, dict) and "profile_id" in upstream and "knobs" in upstream
    chosen = message_knobs(upstream, None, ws) if ladder else None
    if seeds is None:
        seeds = list(chosen.validation_seeds if chosen else DEFAULT_VALIDATION_SEEDS)
    seeds = check_seeds(seeds)
    extra: dict[str, Any] = {}
    try:
        val = validate(key, seeds=seeds, ws=ws, progress=False)
        if not val.passed and chosen is not None:
            ext, val, extra["attempts"] = extract_and_validate(
                validate_key(upstream["profile_id"]),
                chosen.extraction_config(),
                seeds=seeds,
                ws=ws,
                model=chosen.model,
                progress=False,
                validated=val,
            )
            key = ext.key
        if val.passed and chosen is not None and chosen.paraphrases:
            extra["reuse"] = measure_reuse(key, list(chosen.paraphrases), ws=ws)
    except FragmentError as exc:
        log.warning("fragment %s cannot be validated: %s", key, exc)
        status = ws.catalog.get_fragment(key).status
        return {**_verdict(key, status, False, None, reused=False), "error": str(exc)}
    row = ws.catalog.get_fragment(key)
    latest = ws.catalog.latest_validation(key)
    return {**_verdict(key, row.status, latest.passed, latest.id, reused=False), **extra}


def _verdict(
    key: str, status: str, passed: bool, validation_id: int | None, *, reused: bool
) -> dict[str, Any]:
    return {
        "key": key,
        "status": status,
        "passed": passed,
        "validation_id": validation_id,
        "reused": reused,
    }


def generate_message(
    upstream: dict[str, Any] | str | None = None,
    *,
    prompt: str,
    seeds: list[int],
    job_id: str,
    model: str | None = None,
    batch_size: int = 4,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ws: Workspace | None = None,
    progress_callback: Callable[[int, int], None] | None = None,
    reuse_full_model: bool = True,
) -> dict[str, Any]:
    """Generate one batch of seed variants as catalog job ``job_id``.

    ``upstream`` names the fragment to use (validate's result, ``{"key": ...}`` or the key);
    None uses the prompt's ready fragment if there is one. An unusable fragment falls back to
    the full model (``used_fallback``, ``fallback_reason``). A job delivered more than
    ``max_attempts`` times is marked failed with the reason (``error``) and not run again.
    A delivery that finds the job finished by an earlier one (a copy redelivered while or
    after it ran) writes nothing and returns the job's result with ``redelivered`` True.
    ``reuse_full_model``: seeds whose full-model image the chain kept in the store (the
    fragment's profiling and validation seeds) are delivered from it, not generated.

    Returns the job id, image URIs, the fragment key used, ``error``, which seeds' images the
    full model made (``full_model_seeds``) and which of them came from the chain's kept
    images (``reused_full_model_seeds``), where the fragment came
    from (``fragment_source``: ``memory`` — this process held it warm —, ``node cache``,
    ``store`` or None) and what the node's warm cache did for this batch (``warm_cache``:
    hits, misses, fetched bytes).
    """
    ws = ws or workspace()
    key = upstream_field(upstream, "key") if upstream is not None else None
    normalise_prompt(prompt)
    validate_key(job_id)
    attempts = count_delivery(ws, job_id, prompt, seeds, model)
    # A redelivered copy of a batch still running elsewhere waits for it here.
    with write_lock(ws, f"job:{job_id}"):
        finished = _finished_job(ws, job_id, seeds)
        if finished is not None:
            return finished
        reason = give_up_if_poison(ws, job_id, attempts, max_attempts)
        if reason is not None:
            log.error(reason)
            kept = [image.uri for image in ws.catalog.list_images(job_id)]
            return _generation(job_id, seeds, kept, None, False, None, error=reason)
        if key is not None and ws.catalog.find_fragment(key) is None:
            log.warning("fragment %s named upstream is gone: using the prompt's own lookup", key)
            key = None
        warm_before = set(warm_fragment_keys())
        cache = warm_cache(ws)
        counters = _cache_counters(cache)
        result = generate(
            prompt,
            seeds=seeds,
            model=model,
            key=key,
            batch_size=batch_size,
            job_id=job_id,
            ws=ws,
            progress=False,
            progress_callback=progress_callback,
            reuse_full_model=reuse_full_model,
        )
    fetched = {k: v - counters[k] for k, v in _cache_counters(cache).items()}
    if result.fragment_key is None:
        source = None
    elif result.fragment_key in warm_before:
        source = "memory"
    else:
        source = "store" if cache is None or fetched["misses"] else "node cache"
    return {
        **_generation(
            job_id,
            result.seeds,
            result.image_uris,
            result.fragment_key,
            result.used_fallback,
            result.fallback_reason,
        ),
        "full_model_seeds": result.full_model_seeds,
        "reused_full_model_seeds": result.reused_seeds,
        "fragment_source": source,
        "warm_cache": fetched,
        "memory": result.metrics,
        "redelivered": False,
    }


def _finished_job(ws: Workspace, job_id: str, seeds: list[int]) -> dict[str, Any] | None:
    """The result of job ``job_id`` if an earlier delivery finished it (row ``done``, an
    image of every seed), as that delivery returned it but with ``redelivered`` True; else
    None. Nothing is written: the row (``finished_at`` included) stays as it was."""
    row = ws.catalog.get_job(job_id)
    images = {image.seed: image.uri for image in ws.catalog.list_images(job_id)}
    if row.status != "done" or any(seed not in images for seed in seeds):
        return None
    log.warning("job %s was finished by an earlier delivery: nothing to do", job_id)
    metrics = row.metrics or {}
    return {
        **_generation(
            job_id,
            seeds,
            [images[seed] for seed in seeds],
            row.fragment_key,
            row.used_fallback,
            row.fallback_reason,
        ),
        "full_model_seeds": metrics.get("full_model_seeds", []),
        "reused_full_model_seeds": metrics.get("reused_full_model_seeds", []),
        "fragment_source": None,
        "warm_cache": _cache_counters(None),
        "memory": metrics,
        "redelivered": True,
    }


def _cache_counters(cache: Any) -> dict[str, int]:
    if cache is None:
        return {"hits": 0, "misses": 0, "fetched_bytes": 0}
    return {"hits": cache.hits, "misses": cache.misses, "fetched_bytes": cache.fetched_bytes}


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


def fragment_status_message(key: str, *, ws: Workspace | None = None) -> dict[str, Any]:
    """The catalog status of fragment ``key`` (no model is loaded)."""
    ws = ws or workspace()
    row = ws.catalog.get_fragment(validate_key(key))
    return {"key": row.key, "status": row.status, "status_reason": row.status_reason}
