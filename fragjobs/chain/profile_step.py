"""Step 1, profile: record a prompt's per-head, per-block statistics and store them."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fragjobs.chain.bases import base
from fragjobs.chain.knobs import DEFAULT_PROFILE_SEEDS
from fragjobs.chain.workspaces import Workspace, workspace
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
    """
    normalise_prompt(prompt)
    ws = ws or workspace()
    loaded = base(model, ws.settings)
    info = loaded.info
    config = ProfileConfig(
        seeds=tuple(check_seeds(list(seeds))),
        steps=steps if steps is not None else info.default_steps,
        step_stride=step_stride,
        guidance_scale=info.default_guidance if guidance_scale is None else guidance_scale,
        height=info.height,
        width=info.width,
    )
    profile_id = make_fragment_key(info.name, prompt, {"profile": asdict(config)})
    base_row = ws.catalog.get_or_create_base_model(info.name, info.sha256, info.source)
    stats_name = profile_object(profile_id, PROFILE_STATS_FILE)
    doc_name = profile_object(profile_id, PROFILE_IMPORTANCE_FILE)
    existing = ws.catalog.find_profile(profile_id)
    if existing is not None and ws.store.exists(stats_name):
        data = ws.store.get_bytes(stats_name, expected_sha256=existing.stats_sha256)
        return ProfileResult(
            profile_id,
            base_row.id,
            existing.stats_uri,
            existing.importance_uri,
            profile_from_bytes(data),
            reused=True,
        )

    result = profile_prompt(loaded.pipe, prompt, config, progress=progress)
    tmp = ws.settings.data_dir / "tmp" / uuid.uuid4().hex
    try:
        stats_path, doc_path = result.save(tmp)
        stats = ws.store.put_file(stats_name, stats_path)
        doc = ws.store.put_file(doc_name, doc_path)
        ws.catalog.get_or_create_profile(
            profile_id,
            base_row.id,
            result.prompt,
            prompt_hash(prompt),
            {"profile": asdict(config)},
            stats.uri,
            stats.sha256,
            doc.uri,
        )
    except BaseException:
        ws.store.delete(stats_name)
        ws.store.delete(doc_name)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ProfileResult(profile_id, base_row.id, stats.uri, doc.uri, result, reused=False)


def profile_from_bytes(data: bytes) -> PromptProfile:
    """The :class:`PromptProfile` stored as ``stats.safetensors`` bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PROFILE_STATS_FILE
        path.write_bytes(data)
        return PromptProfile.load(path)
