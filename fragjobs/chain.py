"""The chain, in process: profile → extract → validate → generate (DESIGN §1).

Each step is a function that reads its inputs from the catalog and the store and writes its
outputs there, so the same functions serve the embedded default, the CLI, the Celery tasks
and the Python API. Example::

    import fragjobs
    p = fragjobs.profile("a dog on a jet ski", model="tiny-sd")
    f = fragjobs.extract(p.profile_id)
    v = fragjobs.validate(f.key)
    g = fragjobs.generate("a dog on a jet ski", variants=8)

Bad input is rejected before anything is written; a step that fails half-way removes what it
wrote (objects and catalog rows), so no half-written fragment is ever left behind.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fragjobs.base_models import LoadedBase, identify, load_base, prompt_embedding
from fragjobs.cache import lookup_exact, lookup_prompt, lookup_similar
from fragjobs.catalog import Catalog, FragmentEntity
from fragjobs.config import Settings, get_settings
from fragjobs.errors import (
    FragmentError,
    FragmentIntegrityError,
    GateFailedError,
    IntegrityError,
    InvalidInputError,
    ManifestError,
    ObjectNotFoundError,
)
from fragjobs.extraction import (
    BlockCachingConfig,
    ExtractionConfig,
    Fragment,
    HeadSelectionConfig,
    Int8Config,
    LowRankConfig,
    apply_fragment_to_unet_,
    extract_fragment,
    load_fragment_folder,
    read_fragment,
    reset_block_caching,
    seal,
)
from fragjobs.generation import (
    GenerationConfig,
    generate_images,
    measure_latency_ms,
    memory_report,
    with_unet,
)
from fragjobs.keys import (
    FRAGMENT_FILE,
    MANIFEST_FILE,
    PROFILE_IMPORTANCE_FILE,
    PROFILE_STATS_FILE,
    check_fraction,
    check_int,
    check_seeds,
    fragment_object,
    generation_object,
    make_fragment_key,
    normalise_prompt,
    profile_object,
    prompt_hash,
    sha256_hex,
    validate_key,
)
from fragjobs.manifest import FragmentManifest, PerformanceLayer, QualityLayer
from fragjobs.profiling import ProfileConfig, PromptProfile, profile_prompt
from fragjobs.reports import build_metrics_summary, save_compare_image, tensor_to_pil
from fragjobs.storage import LocalStore, ObjectStore, WarmCache, open_store
from fragjobs.validation import compute_quality, evaluate_gate, load_thresholds

log = logging.getLogger("fragjobs")

DEFAULT_PROFILE_SEEDS = (0, 1, 2, 3)
DEFAULT_VALIDATION_SEEDS = (1000, 1001, 1002, 1003)


@dataclass
class Workspace:
    """Where the chain reads and writes: settings, catalog and object store."""

    settings: Settings
    catalog: Catalog
    store: ObjectStore

    @classmethod
    def open(cls, settings: Settings | None = None) -> Workspace:
        """The workspace of the settings; the embedded SQLite catalog is migrated on open."""
        settings = settings or get_settings()
        return cls(
            settings, Catalog.open_embedded(settings), open_store(settings.resolved_storage_url)
        )

    def close(self) -> None:
        self.catalog.dispose()


_WORKSPACES: dict[tuple, Workspace] = {}
_BASES: OrderedDict[tuple, LoadedBase] = OrderedDict()
_WARM_CACHES: dict[tuple, WarmCache] = {}
_FRAGMENT_UNETS: OrderedDict[tuple, tuple[FragmentManifest, torch.nn.Module]] = OrderedDict()

WARM_FRAGMENT_UNETS = 2
"""How many fragment UNets a process keeps built for generation (least recently used go)."""


def workspace(settings: Settings | None = None) -> Workspace:
    """The process-wide workspace for these settings (opened once)."""
    settings = settings or get_settings()
    key = (settings.resolved_database_url, settings.resolved_storage_url)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = Workspace.open(settings)
    return _WORKSPACES[key]


def base(model: str | None, settings: Settings | None = None) -> LoadedBase:
    """The loaded base pipeline (kept warm: the two most recently used stay loaded)."""
    settings = settings or get_settings()
    model = model or settings.default_model
    key = (model, settings.device)
    if key not in _BASES:
        _BASES[key] = load_base(model, settings=settings)
        while len(_BASES) > 2:
            _BASES.popitem(last=False)
    _BASES.move_to_end(key)
    return _BASES[key]


# -- profile ---------------------------------------------------------------------------------


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
        loaded_profile = _profile_from_bytes(data)
        return ProfileResult(
            profile_id,
            base_row.id,
            existing.stats_uri,
            existing.importance_uri,
            loaded_profile,
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
        _rmtree(tmp)
    return ProfileResult(profile_id, base_row.id, stats.uri, doc.uri, result, reused=False)


def _profile_from_bytes(data: bytes) -> PromptProfile:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PROFILE_STATS_FILE
        path.write_bytes(data)
        return PromptProfile.load(path)


# -- extract ---------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    """A stored fragment: its key, manifest and where its folder is."""

    key: str
    manifest: FragmentManifest
    storage_uri: str
    reused: bool
    elapsed_s: float = 0.0


def head_guard(fidelity: float) -> float:
    """The SSIM head pruning alone must keep: half of the fragment's SSIM budget."""
    return round(1.0 - (1.0 - fidelity) / 2, 6)


def extraction_config(
    threshold: float = 0.75,
    *,
    min_heads_per_layer: int = 1,
    rank_margin: float = 0.25,
    low_rank: bool = True,
    int8: bool = True,
    caching: bool = True,
    fidelity: float = 0.9,
    head_guard_on: bool = True,
) -> ExtractionConfig:
    """The extraction config from the CLI's knobs.

    ``fidelity`` is the one quality knob: the SSIM against the full model that the fragment
    must keep on every profiling seed. Head pruning may spend half of the SSIM budget
    (its guard keeps more heads than ``threshold`` asks until it does); block caching, chosen
    on the pruned and compressed UNet, spends the rest. ``head_guard_on=False`` prunes exactly
    ``threshold``.
    """
    check_fraction(fidelity, "fidelity")
    return ExtractionConfig(
        heads=HeadSelectionConfig(
            threshold,
            min_heads_per_layer,
            rank_margin,
            min_ssim=head_guard(fidelity) if head_guard_on else None,
        ),
        low_rank=LowRankConfig() if low_rank else None,
        int8=Int8Config() if int8 else None,
        caching=BlockCachingConfig(min_ssim=fidelity) if caching else None,
    )


def extract(
    profile_id: str,
    config: ExtractionConfig | None = None,
    *,
    ws: Workspace | None = None,
    model: str | None = None,
) -> ExtractResult:
    """Extract the fragment of a stored profile and store it (status ``building``).

    Idempotent: if the key is already in the catalog and stored, nothing is extracted again.
    """
    ws = ws or workspace()
    config = config or ExtractionConfig()
    prof_row = ws.catalog.get_profile(validate_key(profile_id))
    base_row = ws.catalog.get_base_model(prof_row.base_model_id)
    loaded = base(model or base_row.name, ws.settings)
    if loaded.info.sha256 != base_row.sha256:
        raise InvalidInputError(
            f"profile {profile_id} was made on {base_row.name} ({base_row.sha256[:12]}…), "
            f"which is not the model {loaded.info.name} loaded here"
        )
    started = time.perf_counter()
    stats = ws.store.get_bytes(
        profile_object(profile_id, PROFILE_STATS_FILE), expected_sha256=prof_row.stats_sha256
    )
    prof = _profile_from_bytes(stats)
    key = make_fragment_key(loaded.info.name, prof.prompt, config.params(prof))
    existing = ws.catalog.find_fragment(key)
    if existing is not None and existing.manifest_sha256 is not None:  # stored completely
        manifest = _read_manifest(ws, existing)
        return ExtractResult(key, manifest, existing.storage_uri, reused=True)

    fragment, _unet = extract_fragment(
        loaded.pipe, loaded.info, prof, config, profile_id=profile_id
    )
    return _store_fragment(ws, fragment, prof_row, base_row.id, config.params(prof), started)


def _store_fragment(ws, fragment: Fragment, prof_row, base_model_id, params, started):
    info = fragment.manifest.base_model
    folder = fragment_object(info.name, fragment.key, "")[:-1]
    row, created = ws.catalog.create_fragment(
        fragment.key,
        prof_row.profile_id,
        base_model_id,
        prof_row.prompt,
        params,
        ws.store.uri(folder),
    )
    try:
        manifest, data = seal(fragment)
        stored_file = ws.store.put_bytes(
            fragment_object(info.name, fragment.key, FRAGMENT_FILE), data
        )
        manifest_bytes = manifest.to_bytes()
        ws.store.put_bytes(fragment_object(info.name, fragment.key, MANIFEST_FILE), manifest_bytes)
        ws.catalog.update_fragment(
            fragment.key,
            size_bytes=stored_file.size,
            file_sha256=stored_file.sha256,
            manifest_sha256=sha256_hex(manifest_bytes),
        )
    except BaseException:
        if created:
            ws.store.delete_prefix(folder + "/")
            ws.catalog.delete_fragment(fragment.key)
        raise
    return ExtractResult(
        fragment.key,
        manifest,
        row.storage_uri,
        reused=False,
        elapsed_s=time.perf_counter() - started,
    )


# -- load ------------------------------------------------------------------------------------


def load_stored_fragment(key: str, ws: Workspace | None = None) -> Fragment:
    """Read a fragment from the store, checking manifest and file hashes.

    A store that is not a local folder (S3) is read through the node's warm cache
    (:func:`warm_cache`), so a node fetches each fragment object once. A hash mismatch marks
    the fragment ``corrupt`` in the catalog, then raises.

    Raises:
        NotFoundError: no such fragment in the catalog.
        FragmentIntegrityError: stored bytes do not match their hashes.
    """
    ws = ws or workspace()
    row = ws.catalog.get_fragment(validate_key(key))
    try:
        manifest = _read_manifest(ws, row)
        file_bytes = _read_object(ws, _object_of(row, FRAGMENT_FILE), row.file_sha256)
        return read_fragment(manifest.to_bytes(), file_bytes)
    except (IntegrityError, ManifestError, ObjectNotFoundError) as exc:
        ws.catalog.set_fragment_status(key, "corrupt", str(exc)[:500])
        if isinstance(exc, FragmentIntegrityError):
            raise
        raise FragmentIntegrityError(f"fragment {key} is corrupt: {exc}") from exc


def _read_manifest(ws: Workspace, row: FragmentEntity) -> FragmentManifest:
    data = _read_object(ws, _object_of(row, MANIFEST_FILE), row.manifest_sha256)
    return FragmentManifest.from_bytes(data)


def warm_cache(ws: Workspace) -> WarmCache | None:
    """The node-local warm cache in front of ``ws``'s store; None for a local folder.

    A local folder is read at disk speed already; any other store (S3) is read through the
    cache in ``FRAGJOBS_CACHE_DIR`` (bounded by ``FRAGJOBS_CACHE_MAX_BYTES``), shared by the
    processes of a node. One instance per folder and process, so its counters add up.
    """
    if isinstance(ws.store, LocalStore):
        return None
    key = (str(ws.settings.resolved_cache_dir), ws.settings.cache_max_bytes)
    if key not in _WARM_CACHES:
        _WARM_CACHES[key] = WarmCache.from_settings(ws.settings)
    return _WARM_CACHES[key]


def _read_object(ws: Workspace, name: str, sha256: str | None) -> bytes:
    """Object ``name``, checked against ``sha256``; through the warm cache when there is one."""
    cache = warm_cache(ws)
    if cache is None or sha256 is None:
        return ws.store.get_bytes(name, expected_sha256=sha256)
    return cache.get_bytes(ws.store, name, sha256)


def _object_of(row: FragmentEntity, filename: str) -> str:
    base_name = row.key.split("_", 1)[0]
    return fragment_object(base_name, row.key, filename)


def fragment_unet(loaded: LoadedBase, fragment: Fragment) -> torch.nn.Module:
    """A copy of the base UNet with the fragment's edits replayed."""
    unet = copy.deepcopy(loaded.pipe.unet)
    apply_fragment_to_unet_(unet, fragment, loaded.info)
    return unet


def warm_fragment_unet(
    ws: Workspace, loaded: LoadedBase, row: FragmentEntity
) -> tuple[FragmentManifest, torch.nn.Module]:
    """The fragment's manifest and UNet on ``loaded``, built once and kept warm.

    The process keeps the :data:`WARM_FRAGMENT_UNETS` most recently used UNets, keyed by
    fragment key, both stored hashes and the base (a rewritten manifest or another base is
    built anew), so a worker generating batch after batch of one fragment loads it once.
    Block-caching state is reset before a kept UNet is used again.

    Raises:
        FragmentIntegrityError: the fragment cannot be read (see :func:`load_stored_fragment`).
    """
    key = (row.key, row.manifest_sha256, row.file_sha256, loaded.info.sha256, loaded.pipe.device)
    entry = _FRAGMENT_UNETS.get(key)
    if entry is None:
        fragment = load_stored_fragment(row.key, ws)
        entry = _FRAGMENT_UNETS[key] = (fragment.manifest, fragment_unet(loaded, fragment))
        while len(_FRAGMENT_UNETS) > WARM_FRAGMENT_UNETS:
            _FRAGMENT_UNETS.popitem(last=False)
    else:
        reset_block_caching(entry[1])
    _FRAGMENT_UNETS.move_to_end(key)
    return entry


def warm_fragment_keys() -> list[str]:
    """Keys of the fragments this process holds warm (:func:`warm_fragment_unet`), newest first."""
    return list(dict.fromkeys(key[0] for key in reversed(_FRAGMENT_UNETS)))


def apply_fragment_(
    pipe: Any, key_or_path: str | Path, *, ws: Workspace | None = None
) -> FragmentManifest:
    """Apply a stored fragment to your own diffusers pipeline, in place.

    ``key_or_path`` is a fragment key (read from the workspace's store, hashes checked) or a
    folder holding ``manifest.json`` + ``fragment.safetensors``. The pipeline must be the
    fragment's base model (checked by sha256). Afterwards ``pipe(prompt, ...)`` works as usual.
    The edit cannot be undone in place: reload the pipeline to get the full model back.

    Raises:
        BaseModelMismatchError: the pipeline is not the fragment's base.
        FragmentIntegrityError: the fragment's bytes do not match their hashes.
    """
    path = Path(key_or_path)
    if path.is_dir():
        fragment = load_fragment_folder(path)
    else:
        fragment = load_stored_fragment(str(key_or_path), ws)
    apply_fragment_to_unet_(pipe.unet, fragment, identify(pipe))
    return fragment.manifest


# -- validate --------------------------------------------------------------------------------


@dataclass
class ValidationResult:
    """Quality of a fragment against its full model on the same seeds."""

    key: str
    passed: bool
    seeds: list[int]
    metrics: Any
    gate: Any
    full_images: torch.Tensor
    fragment_images: torch.Tensor
    manifest: FragmentManifest
    elapsed_s: float = 0.0


def validate(
    key: str,
    *,
    seeds: list[int] | tuple[int, ...] = DEFAULT_VALIDATION_SEEDS,
    ws: Workspace | None = None,
    progress: bool = True,
    reference: torch.Tensor | None = None,
) -> ValidationResult:
    """Run full model and fragment on the same seeds, gate with ``thresholds.yaml``.

    The catalog gets a validation row and the status ``ready`` or ``failed_gate``; the stored
    manifest gets its ``quality`` layer and ``verified``. ``reference``: the full model's
    images of ``seeds`` made earlier in this process for the same prompt and generation
    settings (``ValidationResult.full_images`` of another fragment of the same profile); they
    are used instead of generating them again.
    """
    ws = ws or workspace()
    seeds = check_seeds(list(seeds))
    if reference is not None and (
        not isinstance(reference, torch.Tensor)
        or reference.dim() != 4
        or len(reference) != len(seeds)
    ):
        raise InvalidInputError(
            f"reference must be a tensor of {len(seeds)} images (N, C, H, W), one per seed"
        )
    thresholds = load_thresholds(ws.settings.thresholds_path)
    started = time.perf_counter()
    fragment = load_stored_fragment(key, ws)
    manifest = fragment.manifest
    loaded = base(manifest.base_model.name, ws.settings)
    gen = _generation_config(manifest, batch_size=len(seeds))
    full = reference
    if full is None:
        full = generate_images(
            loaded.pipe,
            manifest.profiling.prompt,
            seeds,
            gen,
            progress=progress,
            desc="validate: full",
        )
    frag_pipe = with_unet(loaded.pipe, fragment_unet(loaded, fragment))
    frag = generate_images(
        frag_pipe,
        manifest.profiling.prompt,
        seeds,
        gen,
        progress=progress,
        desc="validate: fragment",
    )
    if full.shape != frag.shape:
        raise InvalidInputError(
            f"reference images are {tuple(full.shape)}, the fragment's {tuple(frag.shape)}"
        )
    metrics = _quality(ws, loaded, full, frag, manifest.profiling.prompt)
    gate = evaluate_gate(metrics, thresholds)
    quality = QualityLayer(
        seeds=seeds,
        metrics=metrics.model_dump(mode="json"),
        gate=gate.model_dump(mode="json"),
        thresholds=thresholds.model_dump(mode="json"),
    )
    manifest = manifest.model_copy(update={"quality": quality, "verified": gate.passed})
    _rewrite_manifest(ws, key, manifest)
    ws.catalog.add_validation(key, quality.model_dump(mode="json"), gate.passed)
    ws.catalog.set_fragment_status(
        key,
        "ready" if gate.passed else "failed_gate",
        None if gate.passed else _gate_reason(gate),
    )
    return ValidationResult(
        key,
        gate.passed,
        seeds,
        metrics,
        gate,
        full,
        frag,
        manifest,
        elapsed_s=time.perf_counter() - started,
    )


def _quality(ws: Workspace, loaded: LoadedBase, full, fragment, prompt: str):
    """Quality metrics; CLIP-score uses the configured CLIP, else the model's own shipped one."""
    clip = ws.settings.clip_model_path or loaded.info.clip_path
    return compute_quality(
        full,
        fragment,
        prompt,
        clip_model_path=Path(clip) if clip else None,
        lpips_weights_path=ws.settings.lpips_weights_path,
    )


def _gate_reason(gate) -> str:
    failed = [c for c in gate.checks if c.status == "FAIL"]
    return "; ".join(f"{c.name}={c.value} (limit {c.op} {c.limit})" for c in failed)[:500] or (
        "no quality check could be computed"
    )


def _rewrite_manifest(ws: Workspace, key: str, manifest: FragmentManifest) -> None:
    data = manifest.to_bytes()
    ws.store.put_bytes(fragment_object(manifest.base_model.name, key, MANIFEST_FILE), data)
    ws.catalog.update_fragment(key, manifest_sha256=sha256_hex(data))


def record_performance(
    key: str, performance: PerformanceLayer, ws: Workspace | None = None
) -> FragmentManifest:
    """Store measured timings in the fragment's manifest (``performance.measured_*``)."""
    ws = ws or workspace()
    row = ws.catalog.get_fragment(key)
    manifest = _read_manifest(ws, row).model_copy(update={"performance": performance})
    _rewrite_manifest(ws, key, manifest)
    return manifest


def _generation_config(manifest: FragmentManifest, batch_size: int) -> GenerationConfig:
    p = manifest.profiling
    return GenerationConfig(
        steps=p.steps,
        guidance_scale=p.guidance_scale,
        height=p.height,
        width=p.width,
        batch_size=batch_size,
    )


# -- generate --------------------------------------------------------------------------------


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


def check_variants(variants: Any, settings: Settings) -> int:
    """``variants`` must be an integer in [1, settings.max_variants]."""
    return check_int(variants, "variants", minimum=1, maximum=settings.max_variants)


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
    """
    ws = ws or workspace()
    normalise_prompt(prompt)
    if seeds is None:
        seeds = list(range(check_variants(variants, ws.settings)))
    seeds = check_seeds(seeds)
    check_variants(len(seeds), ws.settings)
    check_int(batch_size, "batch_size", minimum=1, maximum=1024)
    if key is not None:
        validate_key(key)
    job_id = validate_key(job_id) if job_id else uuid.uuid4().hex[:20]
    loaded = base(model, ws.settings)
    base_row = ws.catalog.get_or_create_base_model(
        loaded.info.name, loaded.info.sha256, loaded.info.source
    )
    started = time.perf_counter()

    pipe, used_key, reason, manifest = _fragment_pipe_or_fallback(
        ws, loaded, base_row.id, prompt, key
    )
    job, _ = ws.catalog.create_job(job_id, base_row.id, prompt.strip(), seeds, used_key)
    ws.catalog.update_job(
        job_id, status="running", used_fallback=reason is not None, fallback_reason=reason
    )
    gen = (
        _generation_config(manifest, batch_size)
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


# -- run: the whole chain with a report ------------------------------------------------------


@dataclass
class RunReport:
    """What ``run`` wrote into its output folder."""

    out_dir: Path
    key: str
    passed: bool
    summary: dict[str, Any]
    generation: GenerationResult


def run(
    prompt: str,
    *,
    model: str | None = None,
    variants: int = 8,
    out_dir: Path | str = "fragjobs-out",
    threshold: float = 0.75,
    profile_seeds: list[int] | tuple[int, ...] = DEFAULT_PROFILE_SEEDS,
    validation_seeds: list[int] | tuple[int, ...] = DEFAULT_VALIDATION_SEEDS,
    batch_size: int = 4,
    low_rank: bool = True,
    int8: bool = True,
    caching: bool = True,
    fidelity: float = 0.9,
    paraphrases: list[str] | None = None,
    ws: Workspace | None = None,
    progress: bool = True,
) -> RunReport:
    """Profile, extract, validate, measure and generate; write the run's report files.

    ``out_dir`` receives ``fragment_manifest.json``, ``head_importance.json``,
    ``metrics_summary.json``, ``images/<seed>.png`` and ``compare.png``. H4 and H5 use
    timings measured in this run (full vs fragment, same steps, same batch, warm).
    """
    ws = ws or workspace()
    normalise_prompt(prompt)
    check_variants(variants, ws.settings)
    config = extraction_config(
        threshold, low_rank=low_rank, int8=int8, caching=caching, fidelity=fidelity
    )
    check_seeds(list(profile_seeds))
    check_seeds(list(validation_seeds))
    check_int(batch_size, "batch_size", minimum=1, maximum=1024)
    for text in paraphrases or []:
        normalise_prompt(text)
    out = Path(out_dir)

    t0 = time.perf_counter()
    prof = profile(prompt, model=model, seeds=profile_seeds, ws=ws, progress=progress)
    t1 = time.perf_counter()
    ext, val, attempts = extract_and_validate(
        prof.profile_id, config, seeds=validation_seeds, ws=ws, model=model, progress=progress
    )
    t2 = t1 + sum(a["extract_s"] for a in attempts)
    t3 = t2 + sum(a["validate_s"] for a in attempts)

    loaded = base(model, ws.settings)
    fragment = load_stored_fragment(ext.key, ws)
    frag_unet = fragment_unet(loaded, fragment)
    gen = _generation_config(fragment.manifest, batch_size=min(batch_size, variants))
    latency_full = measure_latency_ms(loaded.pipe, prompt, gen)
    latency_frag = measure_latency_ms(with_unet(loaded.pipe, frag_unet), prompt, gen)
    device = f"{loaded.pipe.device.type}: {_device_name(loaded.pipe.device)}"
    performance = PerformanceLayer(
        device=device,
        steps=gen.steps,
        batch_size=gen.batch_size,
        measured_latency_full_ms=round(latency_full, 3),
        measured_latency_fragment_ms=round(latency_frag, 3),
        measured_speedup=round(latency_full / latency_frag, 4),
    )
    record_performance(ext.key, performance, ws)
    reuse = measure_reuse(ext.key, paraphrases, ws=ws) if paraphrases else None
    manifest = _read_manifest(ws, ws.catalog.get_fragment(ext.key))

    result = generate(
        prompt,
        variants=variants,
        model=model,
        key=ext.key,
        batch_size=batch_size,
        ws=ws,
        progress=progress,
    )
    thresholds = load_thresholds(ws.settings.thresholds_path)
    summary = build_metrics_summary(
        quality=val.metrics,
        gate=val.gate,
        thresholds=thresholds,
        performance={
            "latency_full_ms": latency_full,
            "latency_fragment_ms": latency_frag,
            "batch_size": gen.batch_size,
            "steps": gen.steps,
            "overhead_s": (t1 - t0) + (t2 - t1) + (t3 - t2),
            "profile_s": t1 - t0,
            "extract_s": t2 - t1,
            "validate_s": t3 - t2,
            # a rerun reads profile and fragment back from the store: its overhead is small
            "profile_reused": prof.reused,
            "fragment_reused": ext.reused,
        },
        memory=memory_report(loaded.pipe.unet, frag_unet),
        reuse=reuse,
        model=loaded.info.name,
        prompt=prompt.strip(),
        device=device,
    )
    summary["fragment"] = {
        "key": ext.key,
        "verified": manifest.verified,
        "used_for_generation": not result.used_fallback,
        "fallback_reason": result.fallback_reason,
        "job_id": result.job_id,
        "attempts": attempts,
    }

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "fragment_manifest.json").write_bytes(manifest.to_bytes())
    doc = prof.profile.importance_document()
    (out / "head_importance.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    (out / "metrics_summary.json").write_text(
        json.dumps(summary, indent=2, sort_keys=True, allow_nan=False)
    )
    for seed in result.seeds:
        name = generation_object(result.job_id, f"{seed}.png")
        (out / "images" / f"{seed}.png").write_bytes(ws.store.get_bytes(name))
    save_compare_image(
        val.full_images,
        val.fragment_images,
        val.seeds,
        out / "compare.png",
        title=f"{loaded.info.name}: {prompt.strip()}",
    )
    return RunReport(out, ext.key, val.passed, summary, result)


GATE_ATTEMPTS = 3  # fragments extracted at most for one run before it falls back


def extract_and_validate(
    profile_id: str,
    config: ExtractionConfig,
    *,
    seeds: list[int] | tuple[int, ...] = DEFAULT_VALIDATION_SEEDS,
    ws: Workspace | None = None,
    model: str | None = None,
    progress: bool = True,
    validated: ValidationResult | None = None,
) -> tuple[ExtractResult, ValidationResult, list[dict[str, Any]]]:
    """Extract and validate; when the gate fails, extract a more conservative fragment.

    The profiling seeds decide the edits, the gate judges them on other seeds, and four
    seeds cannot see everything. A fragment that fails the gate is followed by the next
    rung of :func:`conservative_config`, at most :data:`GATE_ATTEMPTS` fragments in all —
    first without head pruning (on a trained model,
    pruning a few heads can flip one unseen seed's layout while every profiling seed keeps
    its SSIM), then with a caching schedule held to half the SSIM loss — each validated on
    the same seeds against the same full-model images (made once). Every attempt stays in
    the catalog (the failed ones as ``failed_gate``). ``validated``: the validation of
    ``config``'s fragment on ``seeds`` when it was made already (the farm's validate task):
    its verdict and full-model images are used instead of validating it again.

    Returns:
        The last extraction and its validation, and one row per attempt
        (``key``, ``heads_kept``, ``heads_total``, ``caching_min_ssim``, ``passed``, ``ssim``,
        ``clip_delta``, ``extract_s``, ``validate_s``).
    """
    ws = ws or workspace()
    attempts: list[dict[str, Any]] = []
    reference = None
    while True:
        started = time.perf_counter()
        ext = extract(profile_id, config, ws=ws, model=model)
        extracted = time.perf_counter()
        if validated is not None and not attempts and validated.key == ext.key:
            val = validated
        else:
            val = validate(ext.key, seeds=seeds, ws=ws, progress=progress, reference=reference)
        pruning, routing = ext.manifest.pruning, ext.manifest.dynamic_routing
        attempts.append(
            {
                "key": ext.key,
                "heads_kept": pruning.heads_kept,
                "heads_total": pruning.heads_total,
                "caching_min_ssim": routing.min_ssim if routing.enabled else None,
                "passed": val.passed,
                "ssim": val.metrics.ssim,
                "clip_delta": val.metrics.clip_delta,
                "extract_s": round(extracted - started, 4),
                "validate_s": round(time.perf_counter() - extracted, 4),
            }
        )
        following = None if val.passed else conservative_config(config, ext.manifest)
        if following is None or len(attempts) >= GATE_ATTEMPTS:
            return ext, val, attempts
        log.warning("fragment %s failed the gate; extracting a more conservative one", ext.key)
        config, reference = following, val.full_images


def conservative_config(
    config: ExtractionConfig, manifest: FragmentManifest
) -> ExtractionConfig | None:
    """The next, more conservative config after ``manifest``'s fragment failed its gate.

    Heads were pruned: the same without head pruning. Else a caching schedule is in use:
    one that may lose half as much SSIM (``head_guard``: 0.9 → 0.95). Else None.
    """
    if manifest.pruning.heads_kept < manifest.pruning.heads_total:
        heads = config.heads
        return replace(
            config,
            heads=HeadSelectionConfig(1.0, heads.min_heads_per_layer, heads.rank_margin),
        )
    caching = config.caching
    if manifest.dynamic_routing.enabled and caching is not None and caching.min_ssim < 1.0:
        return replace(config, caching=replace(caching, min_ssim=head_guard(caching.min_ssim)))
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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
                lambda r: _read_manifest(ws, r),
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


# -- reuse on paraphrases (H3) ---------------------------------------------------------------


def measure_reuse(
    key: str,
    paraphrases: list[str],
    *,
    seeds: list[int] | tuple[int, ...] = DEFAULT_VALIDATION_SEEDS[:2],
    ws: Workspace | None = None,
) -> dict[str, Any]:
    """Gate the fragment on paraphrases of its prompt: full vs fragment, same seeds.

    Returns ``{"pass_rate", "n", "rows"}`` and records it in the manifest's ``reuse`` layer.
    """
    ws = ws or workspace()
    if not paraphrases:
        raise InvalidInputError("give at least one paraphrase to measure reuse")
    texts = [p.strip() for p in paraphrases if normalise_prompt(p)]
    seeds = check_seeds(list(seeds))
    fragment = load_stored_fragment(key, ws)
    manifest = fragment.manifest
    loaded = base(manifest.base_model.name, ws.settings)
    frag_pipe = with_unet(loaded.pipe, fragment_unet(loaded, fragment))
    gen = _generation_config(manifest, batch_size=len(seeds))
    thresholds = load_thresholds(ws.settings.thresholds_path)
    own = torch.tensor(manifest.reuse.prompt_embedding or [])
    rows = []
    for text in texts:
        full = generate_images(loaded.pipe, text, seeds, gen)
        frag = generate_images(frag_pipe, text, seeds, gen)
        metrics = _quality(ws, loaded, full, frag, text)
        gate = evaluate_gate(metrics, thresholds)
        embedding = prompt_embedding(loaded.pipe, text)
        similarity = float(own @ embedding) if own.shape == embedding.shape else None
        rows.append(
            {
                "prompt": text,
                "ssim": metrics.ssim,
                "clip_delta": metrics.clip_delta,
                "passed": gate.passed,
                "similarity": None if similarity is None else round(similarity, 6),
            }
        )
    pass_rate = round(sum(r["passed"] for r in rows) / len(rows), 6)
    reuse = manifest.reuse.model_copy(update={"pass_rate": pass_rate, "paraphrases": rows})
    _rewrite_manifest(ws, key, manifest.model_copy(update={"reuse": reuse}))
    return {"pass_rate": pass_rate, "n": len(rows), "rows": rows}


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "ExtractResult",
    "GenerationResult",
    "ProfileResult",
    "RunReport",
    "ValidationResult",
    "Workspace",
    "apply_fragment_",
    "base",
    "extract",
    "conservative_config",
    "extract_and_validate",
    "extraction_config",
    "generate",
    "load_stored_fragment",
    "measure_reuse",
    "profile",
    "record_performance",
    "run",
    "validate",
    "warm_cache",
    "warm_fragment_keys",
    "warm_fragment_unet",
    "workspace",
]
