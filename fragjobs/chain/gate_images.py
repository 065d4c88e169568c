"""A gate's two sets of images of the same seeds: the full model's and the fragment's.

The full model's are kept and delivered as variants (:mod:`fragjobs.chain.full_images`); the
fragment's are compared with them. A fragment that changes no weight computes its warm-up
steps (every block recomputed, both CFG halves) exactly as the full model does, so when
neither set exists yet the gate runs the fragment once and the full model only from the end
of the warm-up (:mod:`fragjobs.generation.shared_steps`): on ``shapes``' model-level
fragment that is 4 of 20 full-model steps per seed not computed twice. Otherwise (kept full
images, weight edits, a scheduler that draws noise) each model runs on its own, as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from fragjobs.chain.full_images import (
    FullImageSpec,
    decode_in_batches,
    full_model_images,
    store_full_latents,
    stored_full_latents,
)
from fragjobs.extraction.caching_plan import caching_schedule
from fragjobs.generation import GenerationConfig, generate_images, with_unet
from fragjobs.generation.shared_steps import generate_with_snapshots, resumable, resume_latents
from fragjobs.manifest import FragmentManifest


@dataclass(frozen=True)
class GateImages:
    """Both models' images of the gate's seeds (in their order), and how they were made."""

    full: torch.Tensor
    fragment: torch.Tensor
    full_s: float
    """Seconds that made the full model's images (its steps after the shared ones, the
    decoding and keeping them; a kept image's decoding)."""
    shared_steps: int
    """Steps computed once for both models (0: none)."""


def shared_warmup_steps(manifest: FragmentManifest) -> int:
    """The leading steps on which the fragment computes exactly what the full model does.

    0 when the fragment edits weights (pruned heads, int8 or low-rank layers) or has no
    caching schedule; never all of its steps (one is left to resume).
    """
    compression = manifest.compression
    if manifest.pruning.heads_kept < manifest.pruning.heads_total:
        return 0
    if compression.low_rank is not None and compression.low_rank.layers:
        return 0
    if compression.int8 is not None and "int8" in compression.int8.precision_map.values():
        return 0
    schedule = caching_schedule(manifest)
    if schedule is None:
        return 0
    alike = schedule.full_steps() - set(schedule.cfg_steps)
    steps = 0
    while steps in alike:
        steps += 1
    return min(steps, schedule.steps - 1)


def steps_to_share(pipe: Any, manifest: FragmentManifest, gen: GenerationConfig) -> int:
    """The warm-up steps a gate on ``pipe`` with ``gen`` can compute once for both models:
    :func:`shared_warmup_steps` when the schedule is for ``gen``'s steps and ``pipe``'s
    scheduler can be resumed exactly, else 0."""
    shared = shared_warmup_steps(manifest)
    same_steps = gen.steps == manifest.dynamic_routing.steps
    return shared if shared and same_steps and resumable(pipe) else 0


def gate_images(
    ws: Any,
    pipe: Any,
    unet: torch.nn.Module,
    manifest: FragmentManifest,
    profile_id: str,
    spec: FullImageSpec,
    seeds: list[int],
    gen: GenerationConfig,
    *,
    progress: bool = False,
) -> GateImages:
    """The full model's images of ``seeds`` (kept under ``profile_id``, generated and kept
    when missing) and the fragment's (``unet`` in ``pipe``), sharing the warm-up steps when
    both are to be generated (module docstring)."""
    frag_pipe = with_unet(pipe, unet)
    shared = steps_to_share(pipe, manifest, gen)
    kept = stored_full_latents(ws, profile_id, spec, seeds)
    if shared and not kept:
        fragment, snapshots = generate_with_snapshots(
            frag_pipe, spec.prompt, seeds, gen, shared_steps=shared
        )
        started = time.perf_counter()
        latents = resume_latents(pipe, spec.prompt, snapshots, gen)
        store_full_latents(ws, profile_id, spec, seeds, latents)
        full = decode_in_batches(pipe, latents, gen.batch_size)
        return GateImages(full, fragment, time.perf_counter() - started, shared)
    started = time.perf_counter()
    full, _ = full_model_images(
        ws, pipe, profile_id, spec, seeds, gen, progress=progress, kept=kept
    )
    full_s = time.perf_counter() - started
    fragment = generate_images(
        frag_pipe, spec.prompt, seeds, gen, progress=progress, desc="gate: fragment"
    )
    return GateImages(full, fragment, full_s, 0)
