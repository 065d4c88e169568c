"""Step 1, profile: record a prompt's per-head, per-block statistics and store them."""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fragjobs.base_identity import BaseModelInfo
from fragjobs.base_text import truncation_note
from fragjobs.catalog import ProfileEntity
from fragjobs.chain.bases import base
from fragjobs.chain.knobs import DEFAULT_PROFILE_SEEDS
from fragjobs.chain.locks import write_lock
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import IntegrityError, ObjectNotFoundError
from fragjobs.keys import (
    PROFILE_IMPORTANCE_FILE,
    PROFILE_STATS_FILE,
    check_seeds,
    make_fragment_key,
    normalise_prompt,
    profile_object,
    prompt_hash,
)
from fragjobs.profiling import ProfileConfig, PromptProfile, profile_prompt

log = logging.getLogger("fragjobs")


@dataclass
class ProfileResult:
    """A stored profile: its id, where its two files are, and the statistics."""

    profile_id: str
    base_model_id: int
    stats_uri: str
    importance_uri: str
    profile: PromptProfile
    reused: bool


def profile(
    prompt: str,
    *,
    model: str | None = None,
    seeds: list[int] | tuple[int, ...] = DEFAULT_PROFILE_SEEDS,
    steps: int | None = None,
    step_stride: int = 2,
    guidance_scale: float | None = None,
    ws: Workspace | None = None,
    progress: bool = True,
) -> ProfileResult:
    """Profile ``prompt`` on ``model`` and store ``stats.safetensors`` + ``head_importance.json``.

    Idempotent: a profile with the same id already stored is read back, not recomputed.
    Concurrent calls for one profile are serialised (:func:`~fragjobs.chain.locks.write_lock`):
    the first profiles, the others wait and read its files back, so the catalog's sha256 is
    always the stored object's. A row whose object is missing or damaged is profiled again.
    """
    normalise_prompt(prompt)
    ws = ws or workspace()
    loaded = base(model, ws.settings)
    info = loaded.info
    note = truncation_note(loaded.pipe, prompt)
    if note is not None:
        log.warning("%s", note)
    config = profile_config_of(info, seeds, steps, step_stride, guidance_scale)
    profile_id = profile_id_of(info, prompt, config)
    base_row = ws.catalog.get_or_create_base_model(info.name, info.sha256, info.source)
    with write_lock(ws, f"profile:{profile_id}"):
        stored = _stored_profile(ws, profile_id)
        if stored is not None:
            row, data = stored
            return ProfileResult(
                profile_id,
                base_row.id,
                row.stats_uri,
                row.importance_uri,
                profile_from_bytes(data),
                reused=True,
            )
        result = profile_prompt(loaded.pipe, prompt, config, progress=progress)
        stats, doc = _store_profile(ws, profile_id, base_row.id, result, config)
    return ProfileResult(profile_id, base_row.id, stats.uri, doc.uri, result, reused=False)


def profile_config_of(
    info: BaseModelInfo,
    seeds: list[int] | tuple[int, ...],
    steps: int | None = None,
    step_stride: int = 2,
    guidance_scale: float | None = None,
) -> ProfileConfig:
    """The profile settings :func:`profile` uses on the base ``info`` (``None``: the base's
    default steps and guidance)."""
    return ProfileConfig(
        seeds=tuple(check_seeds(list(seeds))),
        steps=steps if steps is not None else info.default_steps,
        step_stride=step_stride,
        guidance_scale=info.default_guidance if guidance_scale is None else guidance_scale,
        height=info.height,
        width=info.width,
    )


def profile_id_of(info: BaseModelInfo, prompt: str, config: ProfileConfig) -> str:
    """The id of ``prompt``'s profile on the base ``info`` with ``config``."""
    return make_fragment_key(info.name, prompt, {"profile": asdict(config)})


def _stored_profile(ws: Workspace, profile_id: str) -> tuple[ProfileEntity, bytes] | None:
    """The catalog row and stored statistics of ``profile_id``; None when not usable.

    A row whose object is missing or does not match its sha256 (a writer died half-way, or
    the object was damaged) is not usable: the caller profiles again and repairs it.
    """
    row = ws.catalog.find_profile(profile_id)
    if row is None:
        return None
    try:
        data = ws.store.get_bytes(
            profile_object(profile_id, PROFILE_STATS_FILE), expected_sha256=row.stats_sha256
        )
    except (IntegrityError, ObjectNotFoundError) as exc:
        log.warning("profile %s is not usable (%s): profiling again", profile_id, exc)
        return None
    return row, data


def _store_profile(ws: Workspace, profile_id, base_model_id, result, config):
    """Store the two files, then the row (or repoint an existing row at them)."""
    stats_name = profile_object(profile_id, PROFILE_STATS_FILE)
    doc_name = profile_object(profile_id, PROFILE_IMPORTANCE_FILE)
    tmp = ws.settings.data_dir / "tmp" / uuid.uuid4().hex
    try:
        stats_path, doc_path = result.save(tmp)
        stats = ws.store.put_file(stats_name, stats_path)
        doc = ws.store.put_file(doc_name, doc_path)
        if ws.catalog.find_profile(profile_id) is None:
            ws.catalog.get_or_create_profile(
                profile_id,
                base_model_id,
                result.prompt,
                prompt_hash(result.prompt),
                {"profile": asdict(config)},
                stats.uri,
                stats.sha256,
                doc.uri,
            )
        else:
            ws.catalog.replace_profile_stats(profile_id, stats.uri, stats.sha256, doc.uri)
    except BaseException:
        ws.store.delete(stats_name)
        ws.store.delete(doc_name)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats, doc


def profile_from_bytes(data: bytes) -> PromptProfile:
    """The :class:`PromptProfile` stored as ``stats.safetensors`` bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PROFILE_STATS_FILE
        path.write_bytes(data)
        return PromptProfile.load(path)
