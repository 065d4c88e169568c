"""Step 4, generate: seed variants with the prompt's fragment, else the full model, loudly."""

from __future__ import annotations

import io
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from fragjobs.base_models import LoadedBase, model_source, prompt_embedding
from fragjobs.chain.bases import base
from fragjobs.chain.fragments import warm_fragment_unet
from fragjobs.chain.knobs import MAX_BATCH_SIZE, check_variants
from fragjobs.chain.rebuild import rebuilt_if_evicted
from fragjobs.chain.stored import read_manifest
from fragjobs.chain.validate_step import generation_config
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import FragmentError, GateFailedError, InvalidInputError, NotFoundError
from fragjobs.generation import BudgetedGeneration, GenerationConfig, check_budget_mb, with_unet
from fragjobs.generation.memory import release_freed_heap
from fragjobs.keys import (
    check_int,
    check_seeds,
    generation_object,
    normalise_prompt,
    validate_key,
)
from fragjobs.library import lookup_exact, lookup_prompt, lookup_similar
from fragjobs.reports import tensor_to_pil

log = logging.getLogger("fragjobs")


@dataclass
class GenerationResult:
    """A finished generation job."""

    job_id: str
    seeds: list[int]
    image_uris: list[str]
    fragment_key: str | None
    used_fallback: bool
    fallback_reason: str | None
    images: torch.Tensor = field(repr=False)
    elapsed_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


def generate(
    prompt: str,
    *,
    variants: int = 4,
    seeds: list[int] | None = None,
    model: str | None = None,
    key: str | None = None,
    batch_size: int = 4,
    steps: int | None = None,
    guidance_scale: float | None = None,
    job_id: str | None = None,
    ws: Workspace | None = None,
    progress: bool = True,
    progress_callback=None,
) -> GenerationResult:
    """Generate seed variants with the prompt's fragment, falling back to the full model.

    The fragment is ``key`` if given, else the ready fragment made for this prompt on this
    base. A missing, corrupt or gate-failing fragment is never fatal: the job runs on the
    full model and says why (log warning + ``used_fallback``/``fallback_reason`` in the
    catalog). Images go to ``generations/<job-id>/<seed>.png`` with ``meta.json``.

    The batch size is chosen to fit the node's memory budget (``FRAGJOBS_MEMORY_BUDGET_MB``,
    default 80 % of the device's free memory), ``batch_size`` being its ceiling; an
    out-of-memory error steps down the ladder of
    :class:`~fragjobs.generation.BudgetedGeneration` (halve the batch, attention slicing and
    VAE tiling, model CPU offload, the full model on the CPU) without losing an image. What
    it did is in the job's ``metrics`` (and ``GenerationResult.metrics``); images made by the
    full model on the CPU set ``used_fallback`` with the reason.

    Raises:
        ConfigError: ``FRAGJOBS_MEMORY_BUDGET_MB`` is not a positive number (nothing written).
        InvalidInputError: a bad prompt, seeds, steps or guidance, or ``job_id`` already
            used for another prompt or other seeds.
        NotFoundError: ``key`` was named and is not in the catalog.
    """
    ws = ws or workspace()
    normalise_prompt(prompt)
    if seeds is None:
        seeds = list(range(check_variants(variants, ws.settings)))
    seeds = check_seeds(seeds)
    check_variants(len(seeds), ws.settings)
    check_int(batch_size, "batch_size", minimum=1, maximum=MAX_BATCH_SIZE)
    if key is not None:
        validate_key(key)
    if steps is not None:
        check_int(steps, "steps", minimum=1, maximum=1000)
    if guidance_scale is not None and (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, int | float)
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise InvalidInputError(
            f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}"
        )
    if key is not None and ws.catalog.find_fragment(key) is None:
        raise NotFoundError(f"no fragment {key!r} in the catalog (see `fragjobs fragments ls`)")
    check_budget_mb(ws.settings.memory_budget_mb)
    job_id = validate_key(job_id) if job_id else uuid.uuid4().hex[:20]
    _check_job_spec(ws, job_id, prompt, seeds)
    loaded = base(model, ws.settings)
    base_row = ws.catalog.get_or_create_base_model(
        loaded.info.name, loaded.info.sha256, loaded.info.source
    )
    started = time.perf_counter()

    pipe, used_key, reason, manifest = _fragment_pipe_or_fallback(
        ws, loaded, base_row.id, prompt, key
    )
    ws.catalog.create_job(job_id, base_row.id, prompt.strip(), seeds, used_key)
    ws.catalog.update_job(
        job_id, status="running", used_fallback=reason is not None, fallback_reason=reason
    )
    if used_key is not None:
        # A farm job's row may have been created before the fragment was chosen: link it.
        ws.catalog.update_job(job_id, fragment_key=used_key)
    gen = (
        generation_config(manifest, batch_size)
        if manifest is not None
        else GenerationConfig(
            steps=steps or loaded.info.default_steps,
            guidance_scale=(
                loaded.info.default_guidance if guidance_scale is None else guidance_scale
            ),
            height=loaded.info.height,
            width=loaded.info.width,
            batch_size=batch_size,
        )
    )
    done = {img.seed: img for img in ws.catalog.list_images(job_id)}
    todo = [s for s in seeds if s not in done]
    uris = {s: img.uri for s, img in done.items()}

    def store(batch: list[int], out: torch.Tensor) -> None:
        for seed, pil in zip(batch, tensor_to_pil(out), strict=True):
            buffer = io.BytesIO()
            pil.save(buffer, format="PNG")
            stored = ws.store.put_bytes(generation_object(job_id, f"{seed}.png"), buffer.getvalue())
            ws.catalog.add_image(job_id, seed, stored.uri, stored.sha256)
            uris[seed] = stored.uri
        if progress_callback is not None:
            progress_callback(len(uris), len(seeds))

    run = BudgetedGeneration(
        pipe, gen, ws.settings.memory_budget_mb, cpu_fallback=lambda: _full_model_on_cpu(ws, loaded)
    )
    earlier = ws.catalog.get_job(job_id).metrics
    try:
        out = run.run(prompt, todo, on_batch=store) if todo else torch.empty(0)
    except BaseException:
        ws.catalog.update_job(job_id, status="failed", metrics=_job_metrics(run, earlier))
        raise
    images = dict(zip(todo, out, strict=True))
    from_seed = run.metrics.get("full_model_on_cpu_from_seed")
    if from_seed is not None:
        oom = f"out of memory: the full model on the CPU made the images from seed {from_seed} on"
        log.warning("job %s: %s", job_id, oom)
        reason = oom if reason is None else f"{reason}; {oom}"
        ws.catalog.update_job(job_id, used_fallback=True, fallback_reason=reason)
    meta = {
        "job_id": job_id,
        "prompt": prompt.strip(),
        "seeds": seeds,
        "base_model": {"name": loaded.info.name, "sha256": loaded.info.sha256},
        "fragment_key": used_key,
        "used_fallback": reason is not None,
        "fallback_reason": reason,
        "steps": gen.steps,
        "guidance_scale": gen.guidance_scale,
    }
    ws.store.put_bytes(
        generation_object(job_id, "meta.json"), json.dumps(meta, indent=2, sort_keys=True).encode()
    )
    ws.catalog.update_job(
        job_id, status="done", finished_at=datetime.now(UTC), metrics=_job_metrics(run, earlier)
    )
    if used_key is not None:
        ws.catalog.mark_fragment_used(used_key)
    release_freed_heap()  # what a node holds between jobs is what its models hold
    stacked = torch.stack([images[s] for s in seeds if s in images]) if images else torch.empty(0)
    return GenerationResult(
        job_id,
        seeds,
        [uris[s] for s in seeds],
        used_key,
        reason is not None,
        reason,
        stacked,
        elapsed_s=time.perf_counter() - started,
        metrics=run.metrics,
    )


def _full_model_on_cpu(ws: Workspace, loaded: LoadedBase) -> Any:
    """The base pipeline on the CPU: the job's own when it is there already, else the same
    base loaded (and kept warm) for the CPU; only called on the ladder's last rung."""
    if torch.device(loaded.pipe.device).type == "cpu":
        return loaded.pipe
    log.warning("loading %s on the CPU for the rest of the job", loaded.info.name)
    cpu_settings = ws.settings.model_copy(update={"device": "cpu"})
    return base(model_source(loaded.info.source, loaded.info.name), cpu_settings).pipe


def _job_metrics(run: BudgetedGeneration, earlier: dict[str, Any] | None) -> dict[str, Any] | None:
    """This delivery's memory metrics; an earlier delivery's out-of-memory events are kept
    (``earlier_oom_events``), so a retried job still shows every step it went through."""
    if not run.metrics:
        return earlier
    kept = [*(earlier or {}).get("earlier_oom_events", []), *(earlier or {}).get("oom_events", [])]
    return {**run.metrics, "earlier_oom_events": kept} if kept else run.metrics


def _check_job_spec(ws: Workspace, job_id: str, prompt: str, seeds: list[int]) -> None:
    """A job id is bound to its prompt and seeds: reusing it for another spec is refused."""
    try:
        job = ws.catalog.get_job(job_id)
    except NotFoundError:
        return
    if normalise_prompt(job.prompt) != normalise_prompt(prompt) or list(job.seeds) != seeds:
        raise InvalidInputError(
            f"job {job_id} exists for prompt {job.prompt!r} and seeds {job.seeds}: "
            "give a new job id for another prompt or other seeds"
        )


def _fragment_pipe_or_fallback(ws, loaded, base_model_id, prompt, key):
    """(pipeline, fragment key or None, fallback reason or None, manifest or None)."""
    if key:
        row = lookup_exact(ws.catalog, key)
    else:
        row = lookup_prompt(ws.catalog, base_model_id, prompt)
        if row is None:
            hit = lookup_similar(
                ws.catalog,
                base_model_id,
                prompt_embedding(loaded.pipe, prompt),
                lambda r: read_manifest(ws, r),
            )
            if hit is not None:
                log.info("reusing fragment %s (cosine %.3f)", hit.fragment.key, hit.similarity)
                row = hit.fragment
    row = rebuilt_if_evicted(ws, row, base_model_id, prompt)  # evicted by the cap: rebuild
    if row is None:
        reason = f"no fragment {key}" if key else "no ready fragment for this or a similar prompt"
        log.warning("generating with the full model: %s", reason)
        return loaded.pipe, None, reason, None
    try:
        if row.status != "ready":
            raise GateFailedError(
                f"fragment {row.key} is {row.status}"
                + (f" ({row.status_reason})" if row.status_reason else "")
            )
        manifest, unet = warm_fragment_unet(ws, loaded, row)
        return with_unet(loaded.pipe, unet), row.key, None, manifest
    except FragmentError as exc:
        log.warning("fragment %s unusable, falling back to the full model: %s", row.key, exc)
        return loaded.pipe, None, f"fragment {row.key} unusable: {exc}", None
