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

import torch

from fragjobs.base_models import prompt_embedding
from fragjobs.chain.bases import base
from fragjobs.chain.fragments import warm_fragment_unet
from fragjobs.chain.knobs import MAX_BATCH_SIZE, check_variants
from fragjobs.chain.stored import read_manifest
from fragjobs.chain.validate_step import generation_config
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import FragmentError, GateFailedError, InvalidInputError, NotFoundError
from fragjobs.generation import GenerationConfig, generate_images, with_unet
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

    Raises:
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
    images = {}
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            out = generate_images(pipe, prompt, batch, gen, progress=False)
            for seed, pil in zip(batch, tensor_to_pil(out), strict=True):
                buffer = io.BytesIO()
                pil.save(buffer, format="PNG")
                stored = ws.store.put_bytes(
                    generation_object(job_id, f"{seed}.png"), buffer.getvalue()
                )
                ws.catalog.add_image(job_id, seed, stored.uri, stored.sha256)
                uris[seed] = stored.uri
            for seed, image in zip(batch, out, strict=True):
                images[seed] = image
            if progress_callback is not None:
                progress_callback(len(uris), len(seeds))
    except BaseException:
        ws.catalog.update_job(job_id, status="failed")
        raise
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
    ws.catalog.update_job(job_id, status="done", finished_at=datetime.now(UTC))
    if used_key is not None:
        ws.catalog.mark_fragment_used(used_key)
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
    )


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
