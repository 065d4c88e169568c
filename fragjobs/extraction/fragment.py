"""A fragment: the edits that turn a base UNet into a prompt-specialised one.

``extract_fragment`` turns a profile into edits and applies them to a copy of the UNet;
``save_fragment``/``read_fragment`` move it as ``fragment.safetensors`` + ``manifest.json``;
``apply_fragment_to_unet_`` replays the edits on a base UNet. The file holds only what is not
in the base: kept-head indices (structural edits), low-rank factors, int8 weights and scales.
The manifest holds the rest (caching schedule, prompt embedding for reuse). Loading = base +
edits, the base checked by sha256.

This module only assembles: each technique (``heads``, ``lowrank``, ``int8``, ``caching``)
plans, applies, names and reads back its own tensors and manifest layer.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors
from torch import nn

from fragjobs.base_identity import BaseModelInfo
from fragjobs.base_text import prompt_embedding
from fragjobs.errors import BaseModelMismatchError, FragmentIntegrityError, ManifestError
from fragjobs.extraction.caching import (
    BlockCachingConfig,
    apply_block_caching,
    caching_schedule,
    routing_layer,
    search_block_caching,
)
from fragjobs.extraction.fidelity import reference_images
from fragjobs.extraction.heads import (
    HeadSelectionConfig,
    apply_head_pruning_,
    guard_head_selection,
    head_pruning_tensors,
    load_head_pruning,
    plan_head_pruning,
    pruning_layer,
)
from fragjobs.extraction.int8 import (
    Int8Config,
    apply_int8_,
    int8_layer,
    int8_tensors,
    load_int8_tensors,
    plan_int8,
    quantize_layers,
)
from fragjobs.extraction.lowrank import (
    LowRankConfig,
    apply_low_rank_,
    install_low_rank_,
    load_low_rank_tensors,
    low_rank_layer,
    low_rank_tensors,
    plan_low_rank,
)
from fragjobs.families import denoiser
from fragjobs.generation.memory import weight_bytes
from fragjobs.keys import (
    FRAGMENT_FILE,
    MANIFEST_FILE,
    make_fragment_key,
    prompt_hash,
    sha256_hex,
)
from fragjobs.manifest import (
    ArtifactFile,
    ArtifactsLayer,
    BaseModelLayer,
    CompressionLayer,
    DynamicRoutingLayer,
    FragmentManifest,
    ProfilingLayer,
    ReuseLayer,
)
from fragjobs.profiling import PromptProfile


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides a fragment's edits (hashed into its key).

    ``low_rank`` / ``int8`` / ``caching`` set to ``None`` turn that technique off.
    """

    heads: HeadSelectionConfig = field(default_factory=HeadSelectionConfig)
    low_rank: LowRankConfig | None = field(default_factory=LowRankConfig)
    int8: Int8Config | None = field(default_factory=Int8Config)
    caching: BlockCachingConfig | None = field(default_factory=BlockCachingConfig)

    def params(self, profile: PromptProfile) -> dict[str, Any]:
        """Canonical parameters: extraction config plus the profiling config it depends on."""
        return {
            "heads": asdict(self.heads),
            "low_rank": asdict(self.low_rank) if self.low_rank else None,
            "int8": asdict(self.int8) if self.int8 else None,
            "caching": self.caching.params() if self.caching else None,
            "profile": asdict(profile.config),
        }


@dataclass
class Fragment:
    """A fragment in memory: its manifest and the tensors of ``fragment.safetensors``."""

    manifest: FragmentManifest
    tensors: dict[str, torch.Tensor]

    @property
    def key(self) -> str:
        """The fragment's key (its manifest's)."""
        return self.manifest.key


def fragment_key(base: BaseModelInfo, profile: PromptProfile, config: ExtractionConfig) -> str:
    """The key of the fragment ``extract_fragment`` would make (DESIGN §3)."""
    return make_fragment_key(base.name, profile.prompt, config.params(profile))


@torch.no_grad()
def extract_fragment(
    pipe: Any,
    base: BaseModelInfo,
    profile: PromptProfile,
    config: ExtractionConfig,
    *,
    profile_id: str,
) -> tuple[Fragment, nn.Module]:
    """Decide and apply the edits on a copy of the pipeline's denoiser, technique by technique.

    Head pruning first (its guard and the caching search compare against the full model's
    images), then low-rank, then int8 on the layers low-rank left alone, then the caching
    search on the edited UNet.

    Returns:
        The fragment (manifest not yet validated: ``quality`` empty, ``verified`` false)
        and the edited UNet copy, ready to be swapped into a pipeline.
    """
    unet = copy.deepcopy(denoiser(pipe))
    height = profile.config.height or base.height
    width = profile.config.width or base.width
    reference = None
    if config.heads.min_ssim is not None or config.caching is not None:
        reference = reference_images(pipe, profile, height, width)

    heads, head_search = config.heads, []
    if heads.min_ssim is not None and heads.threshold < 1.0:
        heads, head_search = guard_head_selection(
            pipe, profile, heads, reference=reference, height=height, width=width
        )
    pruning = plan_head_pruning(profile, heads)
    report = apply_head_pruning_(unet, pruning)
    tensors = head_pruning_tensors(pruning)
    pruned = pruning_layer(pruning, report, requested=config.heads, used=heads, search=head_search)

    low_rank, factorised = None, set()
    if config.low_rank is not None:
        plan = plan_low_rank(unet, config.low_rank)
        tensors |= low_rank_tensors(
            apply_low_rank_(unet, {n: int(p["rank"]) for n, p in plan.items()})
        )
        low_rank, factorised = low_rank_layer(config.low_rank, plan), set(plan)

    int8 = None
    if config.int8 is not None:
        precision = plan_int8(unet, config.int8, skip=factorised)
        quantized = quantize_layers(unet, precision)
        int8 = int8_layer(unet, precision, quantized)
        apply_int8_(unet, quantized)
        tensors |= int8_tensors(quantized)

    routing = DynamicRoutingLayer(enabled=False, reason="block caching not requested")
    if config.caching is not None:
        schedule, search = search_block_caching(
            pipe, unet, profile, config.caching, height=height, width=width, reference=reference
        )
        routing = routing_layer(schedule, search, config.caching)

    manifest = FragmentManifest(
        key=fragment_key(base, profile, config),
        base_model=BaseModelLayer(name=base.name, sha256=base.sha256, source=base.source),
        profiling=_profiling_layer(profile, profile_id, height, width, report["heads_before"]),
        pruning=pruned,
        compression=CompressionLayer(
            low_rank=low_rank,
            int8=int8,
            weight_bytes_base=weight_bytes(denoiser(pipe)),
            weight_bytes_fragment=weight_bytes(unet),
        ),
        artifacts=ArtifactsLayer(files={}),
        dynamic_routing=routing,
        reuse=ReuseLayer(
            prompt_embedding=[round(float(v), 6) for v in prompt_embedding(pipe, profile.prompt)]
        ),
    )
    return Fragment(manifest, tensors), unet


def _profiling_layer(
    profile: PromptProfile, profile_id: str, height: int, width: int, num_heads: int
) -> ProfilingLayer:
    cfg, stability = profile.config, profile.rank_stability()
    return ProfilingLayer(
        profile_id=profile_id,
        prompt=profile.prompt,
        prompt_sha256=prompt_hash(profile.prompt),
        seeds=list(cfg.seeds),
        steps=cfg.steps,
        step_stride=cfg.step_stride,
        sampled_steps=cfg.sampled_steps(),
        guidance_scale=cfg.guidance_scale,
        height=height,
        width=width,
        num_heads=num_heads,
        rank_stability=None if stability is None else round(stability, 6),
        rank_stability_reason=None if stability is not None else "needs two or more seeds",
    )


def fragment_file_bytes(fragment: Fragment) -> bytes:
    """The bytes of ``fragment.safetensors``, tensors sorted by name.

    The tensors' header entries and data are the same for the same tensors; safetensors may
    write the two metadata entries in either order from one process to the next.
    """
    meta = {"fragjobs_key": fragment.key, "base_sha256": fragment.manifest.base_model.sha256}
    return save_safetensors(dict(sorted(fragment.tensors.items())), metadata=meta)


def seal(fragment: Fragment) -> tuple[FragmentManifest, bytes]:
    """Serialise the tensors and record their hash in the manifest's ``artifacts`` layer."""
    data = fragment_file_bytes(fragment)
    artifacts = ArtifactsLayer(
        files={FRAGMENT_FILE: ArtifactFile(sha256=sha256_hex(data), size=len(data))}
    )
    manifest = fragment.manifest.model_copy(update={"artifacts": artifacts})
    fragment.manifest = manifest
    return manifest, data


def save_fragment(fragment: Fragment, folder: Path) -> tuple[Path, Path]:
    """Write ``fragment.safetensors`` and ``manifest.json`` into ``folder``."""
    manifest, data = seal(fragment)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FRAGMENT_FILE).write_bytes(data)
    (folder / MANIFEST_FILE).write_bytes(manifest.to_bytes())
    return folder / FRAGMENT_FILE, folder / MANIFEST_FILE


def read_fragment(manifest_bytes: bytes, file_bytes: bytes) -> Fragment:
    """Parse a manifest and its fragment file, checking the file's sha256 and size.

    Raises:
        ManifestError: the manifest is not a valid v1 manifest.
        FragmentIntegrityError: the file does not match the manifest or cannot be parsed.
    """
    manifest = FragmentManifest.from_bytes(manifest_bytes)
    manifest.verify_artifact(FRAGMENT_FILE, file_bytes)
    try:
        tensors = load_safetensors(file_bytes)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise FragmentIntegrityError(f"{manifest.key}: unreadable fragment file: {exc}") from exc
    return Fragment(manifest, tensors)


def load_fragment_folder(folder: Path) -> Fragment:
    """Read and verify a fragment from a folder holding its two files.

    The file is hashed as a stream, then its tensors are read with ``safetensors.safe_open``
    (memory-mapped), so the process never holds the file's bytes and a copy of its tensors
    at once.

    Raises:
        ManifestError: a file is unreadable or the manifest is invalid.
        FragmentIntegrityError: the file does not match the manifest or cannot be parsed.
    """
    path = folder / FRAGMENT_FILE
    try:
        manifest = FragmentManifest.from_bytes((folder / MANIFEST_FILE).read_bytes())
        digest, size = hashlib.sha256(), 0
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ManifestError(f"cannot read fragment folder {folder}: {exc}") from exc
    entry = manifest.artifacts.files.get(FRAGMENT_FILE)
    if entry is None or entry.sha256 != digest.hexdigest() or entry.size != size:
        # the same check and message as for bytes held in memory
        manifest.verify_artifact(FRAGMENT_FILE, path.read_bytes())
    try:
        tensors = load_safetensors_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise FragmentIntegrityError(f"{manifest.key}: unreadable fragment file: {exc}") from exc
    return Fragment(manifest, tensors)


def check_base(fragment: Fragment, base: BaseModelInfo) -> None:
    """Raise BaseModelMismatchError unless ``base`` is the fragment's base model (sha256)."""
    expected = fragment.manifest.base_model
    if base.sha256 != expected.sha256:
        raise BaseModelMismatchError(
            f"fragment {fragment.key} was made from {expected.name} ({expected.sha256[:12]}…) "
            f"but the pipeline is {base.name} ({base.sha256[:12]}…)"
        )


@torch.no_grad()
def apply_fragment_to_unet_(unet: nn.Module, fragment: Fragment, base: BaseModelInfo) -> None:
    """Replay a fragment's edits on a base UNet, in place.

    ``fragjobs.extraction.lean_load.build_fragment_unet`` makes the same UNet without the
    base's weights it replaces.

    Raises:
        BaseModelMismatchError: ``base`` is not the fragment's base model.
    """
    check_base(fragment, base)
    tensors, compression = fragment.tensors, fragment.manifest.compression
    apply_head_pruning_(unet, load_head_pruning(tensors))
    if compression.low_rank is not None and compression.low_rank.layers:
        install_low_rank_(unet, load_low_rank_tensors(tensors, compression.low_rank.layers))
    if compression.int8 is not None:
        apply_int8_(unet, load_int8_tensors(tensors, compression.int8.precision_map))
    schedule = caching_schedule(fragment.manifest)
    if schedule is not None:
        apply_block_caching(unet, schedule)
