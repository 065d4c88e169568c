"""Step 3, validate: full model vs fragment on the same held-out seeds, gated by
``thresholds.yaml``.

The full model's images of the validation seeds are kept beside the profile
(:mod:`fragjobs.chain.full_images`): the chain delivers them as variants, and a later
validation of the same prompt, settings and seeds decodes them instead of generating them
again, so only the fragment's images are generated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fragjobs.base_models import LoadedBase
from fragjobs.chain.bases import base_of
from fragjobs.chain.fragments import fragment_unet, load_stored_fragment
from fragjobs.chain.full_images import FullImageSpec, full_model_images
from fragjobs.chain.knobs import DEFAULT_VALIDATION_SEEDS
from fragjobs.chain.library_cap import enforce_library_cap
from fragjobs.chain.stored import update_manifest
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import InvalidInputError
from fragjobs.generation import GenerationConfig, generate_images, with_unet
from fragjobs.keys import check_seeds
from fragjobs.manifest import FragmentManifest, QualityLayer
from fragjobs.validation import compute_quality, evaluate_gate, load_thresholds


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
    full_generated_seeds: list[int] | None = None
    """Seeds whose full-model images this validation generated (the others were kept from an
    earlier one or given as ``reference``); None when not known."""


def validate(
    key: str,
    *,
    seeds: list[int] | tuple[int, ...] = DEFAULT_VALIDATION_SEEDS,
    ws: Workspace | None = None,
    progress: bool = True,
    reference: torch.Tensor | None = None,
) -> ValidationResult:
    """Run full model and fragment on the same held-out seeds, gate with ``thresholds.yaml``.

    The catalog gets a validation row and the status ``ready`` or ``failed_gate``; the stored
    manifest gets its ``quality`` layer and ``verified``. ``reference``: the full model's
    images of ``seeds`` made earlier in this process for the same prompt and generation
    settings (``ValidationResult.full_images`` of another fragment of the same profile); they
    are used instead of generating them again. Without it, the full model's images kept by an
    earlier validation of the same base, prompt, settings and seeds are decoded, and only the
    missing ones are generated (and kept: :mod:`fragjobs.chain.full_images`).

    Raises:
        InvalidInputError: a seed the fragment was profiled on (the gate judges held-out
            seeds only), or a ``reference`` that is not one image per seed.
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
    profiled = sorted(set(seeds) & set(manifest.profiling.seeds))
    if profiled:
        raise InvalidInputError(
            f"validation seeds must be held out: {profiled} were profiled for fragment {key}; "
            "choose other seeds"
        )
    loaded = fragment_base(ws, key)
    gen = generation_config(manifest, batch_size=len(seeds))
    full, generated = reference, None
    if full is None:
        full, generated = full_model_images(
            ws,
            loaded.pipe,
            manifest.profiling.profile_id,
            FullImageSpec.of(loaded.info.sha256, manifest.profiling.prompt, gen),
            seeds,
            gen,
            progress=progress,
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
    metrics = quality(ws, loaded, full, frag, manifest.profiling.prompt)
    gate, layer = judge(metrics, thresholds, seeds)
    manifest = update_manifest(ws, key, {"quality": layer, "verified": gate.passed})
    ws.catalog.add_validation(key, layer.model_dump(mode="json"), gate.passed)
    ws.catalog.set_fragment_status(
        key,
        "ready" if gate.passed else "failed_gate",
        None if gate.passed else gate_reason(gate),
    )
    if gate.passed:
        enforce_library_cap(ws, keep=key)  # FRAGJOBS_LIBRARY_MAX_BYTES; unset: nothing to do
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
        full_generated_seeds=generated,
    )


def judge(metrics: Any, thresholds: Any, seeds: list[int]) -> tuple[Any, QualityLayer]:
    """The gate's verdict on ``metrics`` and the manifest's ``quality`` layer recording it."""
    gate = evaluate_gate(metrics, thresholds, seeds)
    layer = QualityLayer(
        seeds=seeds,
        metrics=metrics.model_dump(mode="json"),
        gate=gate.model_dump(mode="json"),
        thresholds=thresholds.model_dump(mode="json"),
    )
    return gate, layer


def gate_figures(metrics: Any) -> dict[str, Any]:
    """The figures a gate-ladder row shows of a validation's metrics: mean SSIM, the worst
    seed's SSIM and colour difference (None when it was not computed), CLIP delta."""
    colour = metrics.colour_delta_e_per_image
    return {
        "ssim": metrics.ssim,
        "ssim_worst": min(metrics.ssim_per_image),
        "colour_delta_e_worst": max(colour) if colour else None,
        "clip_delta": metrics.clip_delta,
    }


def fragment_base(ws: Workspace, key: str) -> LoadedBase:
    """The fragment's base, loaded from where the catalog says it came from."""
    row = ws.catalog.get_fragment(key)
    return base_of(ws.catalog.get_base_model(row.base_model_id), ws.settings)


def quality(ws: Workspace, loaded: LoadedBase, full, fragment, prompt: str):
    """Quality metrics; CLIP-score uses the configured CLIP, else the model's own shipped one."""
    clip = ws.settings.clip_model_path or loaded.info.clip_path
    return compute_quality(
        full,
        fragment,
        prompt,
        clip_model_path=Path(clip) if clip else None,
        lpips_weights_path=ws.settings.lpips_weights_path,
    )


def gate_reason(gate) -> str:
    """One line naming the gate's failed checks, each with its worst seed."""
    failed = [c for c in gate.checks if c.status == "FAIL"]
    return "; ".join(c.reason for c in failed)[:500] or "no quality check could be computed"


def generation_config(manifest: FragmentManifest, batch_size: int) -> GenerationConfig:
    """The generation settings the fragment was profiled with, at ``batch_size``."""
    p = manifest.profiling
    return GenerationConfig(
        steps=p.steps,
        guidance_scale=p.guidance_scale,
        height=p.height,
        width=p.width,
        batch_size=batch_size,
    )
