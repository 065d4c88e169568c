"""Fidelity checks used while extracting: a candidate UNet against the full model's images.

The full model's images for the profiling seeds come from the profile's own final latents
(decoded), so a check costs only the candidate's generation. The worst seed decides, as in
the quality gate, so :func:`seed_ssim_until` stops a check at the first seed below the
limit. The searches hold SSIM only; the gate's colour check (its limit is in
``thresholds.yaml``, not a search knob) judges the result, and a fragment it refuses is
followed by the ladder's next rung (:mod:`fragjobs.chain.ladder`).
"""

from __future__ import annotations

from typing import Any

import torch

from fragjobs.generation import GenerationConfig, decode_latents, generate_images, with_unet
from fragjobs.profiling import PromptProfile
from fragjobs.validation import compute_quality


def profiling_generation(profile: PromptProfile, height: int, width: int) -> GenerationConfig:
    """The generation settings of the profiling run (all seeds in one batch)."""
    cfg = profile.config
    return GenerationConfig(
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        height=height,
        width=width,
        batch_size=len(cfg.seeds),
    )


@torch.no_grad()
def reference_images(pipe: Any, profile: PromptProfile, height: int, width: int) -> torch.Tensor:
    """The full model's images for the profiling seeds (regenerated if the profile has none)."""
    seeds = list(profile.config.seeds)
    latents = getattr(profile, "final_latents", None)
    if latents is not None and latents.shape[0] == len(seeds):
        return decode_latents(pipe, latents)
    return generate_images(
        pipe, profile.prompt, seeds, profiling_generation(profile, height, width)
    )


@torch.no_grad()
def seed_ssim(
    pipe: Any,
    unet: torch.nn.Module,
    profile: PromptProfile,
    reference: torch.Tensor,
    gen: GenerationConfig,
) -> tuple[float, float]:
    """``(worst, mean)`` SSIM of ``unet``'s images against ``reference`` on the profiling seeds."""
    images = generate_images(with_unet(pipe, unet), profile.prompt, list(profile.config.seeds), gen)
    quality = compute_quality(reference, images, profile.prompt)
    return min(quality.ssim_per_image), quality.ssim


@torch.no_grad()
def seed_ssim_until(
    pipe: Any,
    unet: torch.nn.Module,
    profile: PromptProfile,
    reference: torch.Tensor,
    gen: GenerationConfig,
    *,
    min_ssim: float,
    first: int,
) -> dict[int, float]:
    """SSIM per profiling seed, stopping at the first seed below ``min_ssim``.

    Seed ``first`` (the one likeliest to fail, e.g. the worst of the last trial) is
    generated alone; only if it keeps ``min_ssim`` are the others generated, in one batch.

    Returns:
        ``{seed: ssim}`` for the seeds generated (all of them unless one failed).
    """
    seeds = list(profile.config.seeds)
    order = [first] + [s for s in seeds if s != first]
    pipe = with_unet(pipe, unet)
    scores: dict[int, float] = {}
    for batch in (order[:1], order[1:]):
        if not batch:
            continue
        images = generate_images(pipe, profile.prompt, batch, gen)
        rows = reference[[seeds.index(s) for s in batch]]
        quality = compute_quality(rows, images, profile.prompt)
        scores |= dict(zip(batch, quality.ssim_per_image, strict=True))
        if min(scores.values()) < min_ssim:
            break
    return scores
