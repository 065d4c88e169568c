"""A fragment: the edits that turn a base UNet into a prompt-specialised one.

``extract_fragment`` turns a profile into edits and applies them to a copy of the UNet;
``save_fragment``/``read_fragment`` move it as ``fragment.safetensors`` + ``manifest.json``;
``apply_fragment_to_unet_`` replays the edits on a base UNet. The file holds only what is not
in the base: kept-head indices (structural edits), low-rank factors, int8 weights and scales.
The manifest holds the rest (caching schedule, prompt embedding for reuse). Loading = base +
edits, the base checked by sha256.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from fragjobs.base_models import BaseModelInfo, prompt_embedding
from fragjobs.errors import BaseModelMismatchError, FragmentIntegrityError, ManifestError
from fragjobs.extraction.caching import (
    BlockCachingConfig,
    CachingSchedule,
    apply_block_caching,
    search_block_caching,
)
from fragjobs.extraction.fidelity import profiling_generation, reference_images, seed_ssim
from fragjobs.extraction.heads import (
    HeadPruningConfig,
    HeadSelectionConfig,
    apply_head_pruning_,
    guard_fractions,
    select_heads,
)
from fragjobs.extraction.int8 import Int8Config, apply_int8_, plan_int8, quantize_weight
from fragjobs.extraction.lowrank import (
    LowRankConfig,
    apply_low_rank_,
    install_low_rank_,
    low_rank_from_factors,
    select_ranks,
)
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
    Int8Layer,
    LowRankLayer,
    ProfilingLayer,
    PruningLayer,
    ReuseLayer,
)
from fragjobs.profiling import PromptProfile


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides a fragment's edits (hashed into its key).

    ``low_rank`` / ``int8`` set to ``None`` turn that technique off.
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
            "caching": asdict(self.caching) if self.caching else None,
            "profile": asdict(profile.config),
        }


@dataclass
class Fragment:
    """A fragment in memory: its manifest and the tensors of ``fragment.safetensors``."""

    manifest: FragmentManifest
    tensors: dict[str, torch.Tensor]

    @property
    def key(self) -> str:
        return self.manifest.key


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


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
    """Decide and apply the edits on a copy of ``pipe.unet``.

    Returns:
        The fragment (manifest not yet validated: ``quality`` empty, ``verified`` false)
        and the edited UNet copy, ready to be swapped into a pipeline.
    """
    unet = copy.deepcopy(pipe.unet)
    bytes_base = weight_bytes(pipe.unet)
    tensors: dict[str, torch.Tensor] = {}
    cfg = profile.config
    height, width = cfg.height or base.height, cfg.width or base.width
    reference = None
    if config.heads.min_ssim is not None or config.caching is not None:
        reference = reference_images(pipe, profile, height, width)

    heads, head_search = config.heads, []
    if heads.min_ssim is not None and heads.threshold < 1.0:
        heads, head_search = _guard_heads(pipe, profile, heads, reference, height, width)
    pruning = select_heads(profile.head_scores(), profile.rank_std(), heads)
    pruning_report = apply_head_pruning_(unet, pruning)
    for name, kept in pruning.keep.items():
        tensors[f"pruning.{name}.keep"] = torch.tensor(kept, dtype=torch.int64)

    low_rank_layer = None
    factorised: set[str] = set()
    if config.low_rank is not None:
        plan = select_ranks(unet, config.low_rank)
        replaced = apply_low_rank_(unet, {n: int(p["rank"]) for n, p in plan.items()})
        for name, layer in replaced.items():
            tensors[f"low_rank.{name}.down"] = layer.down.weight.detach().cpu().contiguous()
            tensors[f"low_rank.{name}.up"] = layer.up.weight.detach().cpu().contiguous()
            if layer.up.bias is not None:
                tensors[f"low_rank.{name}.bias"] = layer.up.bias.detach().cpu().contiguous()
        factorised = set(plan)
        low_rank_layer = LowRankLayer(
            energy=config.low_rank.energy, max_cost=config.low_rank.max_cost, layers=plan
        )

    int8_layer = None
    if config.int8 is not None:
        precision = plan_int8(unet, config.int8, skip=factorised)
        quantized, max_error = {}, 0.0
        for name, kind in precision.items():
            if kind != "int8":
                continue
            weight = unet.get_submodule(name).weight
            q, scale = quantize_weight(weight)
            restored = q.float() * scale.view(-1, *([1] * (q.dim() - 1)))
            max_error = max(max_error, float((restored - weight.float()).abs().max()))
            quantized[name] = (q, scale)
            tensors[f"int8.{name}.weight"] = q.cpu().contiguous()
            tensors[f"int8.{name}.scale"] = scale.cpu().contiguous()
        apply_int8_(unet, quantized)
        int8_layer = Int8Layer(
            precision_map=precision, max_abs_error=round(max_error, 8) if quantized else None
        )

    routing = DynamicRoutingLayer(enabled=False, reason="block caching not requested")
    if config.caching is not None:
        schedule, search = search_block_caching(
            pipe, unet, profile, config.caching, height=height, width=width, reference=reference
        )
        routing = _routing_layer(schedule, search, config.caching)

    embedding = prompt_embedding(pipe, profile.prompt)
    key = fragment_key(base, profile, config)
    stability = profile.rank_stability()
    manifest = FragmentManifest(
        key=key,
        base_model=BaseModelLayer(name=base.name, sha256=base.sha256, source=base.source),
        profiling=ProfilingLayer(
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
            num_heads=pruning_report["heads_before"],
            rank_stability=None if stability is None else round(stability, 6),
            rank_stability_reason=None if stability is not None else "needs two or more seeds",
        ),
        pruning=PruningLayer(
            threshold=heads.threshold,
            min_heads_per_layer=heads.min_heads_per_layer,
            rank_margin=heads.rank_margin,
            requested_threshold=config.heads.threshold,
            min_ssim=heads.min_ssim,
            search=head_search,
            heads_total=pruning_report["heads_before"],
            heads_kept=pruning_report["heads_after"],
            keep={n: list(k) for n, k in pruning.keep.items()},
            reasons=pruning.reasons,
            params_before=pruning_report["params_before"],
            params_after=pruning_report["params_after"],
        ),
        compression=CompressionLayer(
            low_rank=low_rank_layer,
            int8=int8_layer,
            weight_bytes_base=bytes_base,
            weight_bytes_fragment=weight_bytes(unet),
        ),
        artifacts=ArtifactsLayer(files={}),
        dynamic_routing=routing,
        reuse=ReuseLayer(prompt_embedding=[round(float(v), 6) for v in embedding]),
    )
    return Fragment(manifest, tensors), unet


def _guard_heads(pipe, profile, heads, reference, height, width):
    """The smallest kept fraction whose pruned UNet keeps ``heads.min_ssim`` (bisected)."""
    gen = profiling_generation(profile, height, width)
    scores, rank_std = profile.head_scores(), profile.rank_std()
    fractions = guard_fractions(heads)
    rows: list[dict[str, float | None]] = []
    chosen, low, high = 1.0, 0, len(fractions) - 1
    while low <= high:
        middle = (low + high) // 2
        candidate = replace(heads, threshold=fractions[middle])
        unet = copy.deepcopy(pipe.unet)
        report = apply_head_pruning_(unet, select_heads(scores, rank_std, candidate))
        worst, mean = seed_ssim(pipe, unet, profile, reference, gen)
        del unet
        rows.append(
            {
                "threshold": fractions[middle],
                "heads_kept": report["heads_after"],
                "ssim_min": round(worst, 6),
                "ssim_mean": round(mean, 6),
            }
        )
        if worst >= heads.min_ssim:
            chosen, high = fractions[middle], middle - 1
        else:
            low = middle + 1
    return replace(heads, threshold=chosen), rows


def _routing_layer(schedule, search, config: BlockCachingConfig) -> DynamicRoutingLayer:
    if schedule is None:
        return DynamicRoutingLayer(
            enabled=False,
            min_ssim=config.min_ssim,
            search=search,
            reason=f"no candidate schedule kept SSIM >= {config.min_ssim} on the profiling seeds",
        )
    return DynamicRoutingLayer(
        enabled=True,
        steps=schedule.steps,
        delta=schedule.delta,
        shallow_delta=schedule.shallow_delta,
        warmup_steps=schedule.warmup_steps,
        schedule={b: list(s) for b, s in sorted(schedule.recompute.items())},
        estimated_cost=schedule.estimated_cost,
        min_ssim=config.min_ssim,
        search=search,
    )


def caching_schedule(manifest: FragmentManifest) -> CachingSchedule | None:
    """The manifest's block-caching schedule, or None when it has none."""
    routing = manifest.dynamic_routing
    if not routing.enabled or not routing.schedule or routing.steps is None:
        return None
    return CachingSchedule(
        steps=routing.steps,
        recompute={b: tuple(s) for b, s in routing.schedule.items()},
        delta=routing.delta or 0.0,
        estimated_cost=routing.estimated_cost or 1.0,
        shallow_delta=routing.shallow_delta,
        warmup_steps=routing.warmup_steps or 1,
    )


def fragment_file_bytes(fragment: Fragment) -> bytes:
    """The bytes of ``fragment.safetensors`` (deterministic for the same tensors)."""
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
    """Read and verify a fragment from a folder holding its two files."""
    try:
        manifest_bytes = (folder / MANIFEST_FILE).read_bytes()
        file_bytes = (folder / FRAGMENT_FILE).read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read fragment folder {folder}: {exc}") from exc
    return read_fragment(manifest_bytes, file_bytes)


@torch.no_grad()
def apply_fragment_to_unet_(unet: nn.Module, fragment: Fragment, base: BaseModelInfo) -> None:
    """Replay a fragment's edits on a base UNet, in place.

    Raises:
        BaseModelMismatchError: ``base`` is not the fragment's base model.
    """
    expected = fragment.manifest.base_model
    if base.sha256 != expected.sha256:
        raise BaseModelMismatchError(
            f"fragment {fragment.key} was made from {expected.name} ({expected.sha256[:12]}…) "
            f"but the pipeline is {base.name} ({base.sha256[:12]}…)"
        )
    t = fragment.tensors
    keep = {
        name[len("pruning.") : -len(".keep")]: tuple(int(h) for h in tensor.tolist())
        for name, tensor in t.items()
        if name.startswith("pruning.")
    }
    apply_head_pruning_(unet, HeadPruningConfig(keep=keep))
    low_rank = fragment.manifest.compression.low_rank
    if low_rank is not None and low_rank.layers:
        like = next(unet.parameters())
        install_low_rank_(
            unet,
            {
                name: low_rank_from_factors(
                    t[f"low_rank.{name}.down"],
                    t[f"low_rank.{name}.up"],
                    t.get(f"low_rank.{name}.bias"),
                    like,
                )
                for name in low_rank.layers
            },
        )
    int8 = fragment.manifest.compression.int8
    if int8 is not None:
        quantized = {
            name: (t[f"int8.{name}.weight"], t[f"int8.{name}.scale"])
            for name, kind in int8.precision_map.items()
            if kind == "int8"
        }
        apply_int8_(unet, quantized)
    schedule = caching_schedule(fragment.manifest)
    if schedule is not None:
        apply_block_caching(unet, schedule)
