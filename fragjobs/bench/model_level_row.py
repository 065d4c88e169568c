"""The benchmark's ``model_level`` method: the chain's model-level fragment of the base.

``model_level`` (or ``model_level@0.95``: another fidelity) builds what
:func:`fragjobs.chain.model_level.model_level_fragment` builds, without a catalog: the
built-in calibration prompts profiled with the benchmark's settings, the schedule searched
against all of them (:mod:`fragjobs.extraction.shared_schedule`), on the chain's edits
(block caching, no head pruning; int8 only where its layers would not compute as float, as
the chain decides). Its row carries ``build_s`` (the one-off, once per base, never per
prompt) and ``gate_s``: what a prompt pays to use it in the chain — the full model and the
fragment on the chain's four validation seeds (their warm-up steps computed once, as the
chain's gate does: :mod:`fragjobs.chain.gate_images`), then the gate's metrics. Its
break-even counts ``gate_s`` beyond the four full-model images it delivers.

Only built-in bases have calibration prompts without a catalog; for any other the row says
so (the chain calibrates a folder on its earlier prompts).
"""

from __future__ import annotations

import time
from typing import Any

from fragjobs.bench.methods import extraction_config
from fragjobs.errors import InvalidInputError

GATE_SEEDS = 4
"""Validation seeds of the chain's gate (``DEFAULT_VALIDATION_SEEDS``)."""


def build(pipe: Any, info: Any, profile_config: Any, fidelity: float) -> tuple[Any, Any, dict]:
    """The model-level fragment, its denoiser copy and the row's figures (``build_s``,
    ``calibration_prompts``, ``caching``).

    Raises:
        InvalidInputError: the base is not a built-in (no calibration prompts here).
    """
    from fragjobs.chain.model_level import builtin_calibration_prompts
    from fragjobs.extraction.int8_exec import int8_computes_as_float
    from fragjobs.extraction.shared_schedule import extract_model_level_fragment
    from fragjobs.families import denoiser
    from fragjobs.profiling import profile_prompt

    if not info.source.startswith("builtin:"):
        raise InvalidInputError(
            f"{info.name} is not a built-in: its calibration prompts are the prompts of its "
            "own fragments in a catalog, which the benchmark has not"
        )
    started = time.perf_counter()
    techniques = "caching" if int8_computes_as_float(denoiser(pipe)) else "int8+caching"
    prompts = builtin_calibration_prompts()
    profiles = [profile_prompt(pipe, p, profile_config, progress=False) for p in prompts]
    fragment, unet = extract_model_level_fragment(
        pipe,
        info,
        profiles,
        extraction_config(techniques, 1.0, fidelity),
        profile_id="bench",
        key="bench",
    )
    routing = fragment.manifest.dynamic_routing
    extra = {
        "build_s": round(time.perf_counter() - started, 2),
        "fidelity": fidelity,
        "techniques": techniques,
        "calibration_prompts": prompts,
        "caching": routing.model_dump(
            include={"enabled", "delta", "shallow_delta", "estimated_cost"}
        ),
    }
    return fragment, unet, extra


def gate_seconds(
    pipe: Any, fragment: Any, fragment_pipe: Any, prompt: str, seeds: list[int], gen: Any
) -> tuple[float, int]:
    """Seconds of the chain's gate on ``seeds`` (full model, fragment, then the metrics), and
    the warm-up steps the two computed once."""
    from fragjobs.chain.full_images import decode_in_batches
    from fragjobs.chain.gate_images import steps_to_share
    from fragjobs.generation import generate_images
    from fragjobs.generation.shared_steps import generate_with_snapshots, resume_latents
    from fragjobs.validation import compute_quality

    shared = steps_to_share(pipe, fragment.manifest, gen)
    started = time.perf_counter()
    if shared:
        images, snapshots = generate_with_snapshots(
            fragment_pipe, prompt, seeds, gen, shared_steps=shared
        )
        full = decode_in_batches(pipe, resume_latents(pipe, prompt, snapshots, gen), len(seeds))
    else:
        full = generate_images(pipe, prompt, seeds, gen)
        images = generate_images(fragment_pipe, prompt, seeds, gen)
    compute_quality(full, images, prompt)
    return time.perf_counter() - started, shared
