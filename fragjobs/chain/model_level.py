"""The model-level fragment: extracted once per base, only gated per prompt.

A prompt's own fragment costs a profile, an extraction (head guard, caching trials) and a
validation before its first variant; on ``shapes`` that is 40–130 variants' worth of saved
time (docs/results.md, H5). The results page's schedule ablation found a schedule calibrated
on other prompts as good as a prompt's own on 8 of 10 prompts, so the chain shares one:

1. :func:`model_level_fragment` finds this base's model-level fragment (same extraction
   settings) in the catalog, or builds it once: profiles of the calibration prompts
   (:func:`calibration_prompts`), a schedule searched against all of them
   (:mod:`fragjobs.extraction.shared_schedule`), stored like any fragment (lineage to the
   first calibration profile, the prompts in its ``params["model_level"]``) and validated on
   held-out seeds of its first prompt.
2. :func:`gate_for_prompt` judges it on a new prompt: the full model's images of the
   validation seeds (kept under the profile id the prompt's own chain would use, so they
   are delivered as variants and a fallback chain reuses them) against the fragment's on the
   same seeds, by the same gate. The verdict is a validation row of the model-level
   fragment, with the prompt; a prompt it fails does not change the fragment's status.

:func:`fragjobs.chain.run` tries this first (knob ``model_level``, setting
``FRAGJOBS_MODEL_LEVEL``) and falls back to the prompt's own chain when there is no
model-level fragment or the gate fails; either way the report says which and counts every
second spent.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from fragjobs.base_models import LoadedBase
from fragjobs.chain.bases import base
from fragjobs.chain.extract_step import store_fragment
from fragjobs.chain.fragments import warm_fragment_unet
from fragjobs.chain.full_images import FullImageSpec
from fragjobs.chain.gate_images import gate_images
from fragjobs.chain.knobs import ChainKnobs
from fragjobs.chain.locks import write_lock
from fragjobs.chain.profile_step import profile, profile_config_of, profile_id_of
from fragjobs.chain.stored import read_manifest
from fragjobs.chain.validate_step import (
    gate_figures,
    gate_reason,
    generation_config,
    judge,
    quality,
    validate,
)
from fragjobs.chain.workspaces import Workspace
from fragjobs.extraction.fragment import ExtractionConfig
from fragjobs.extraction.int8_exec import int8_computes_as_float
from fragjobs.extraction.shared_schedule import extract_model_level_fragment
from fragjobs.families import denoiser
from fragjobs.keys import make_fragment_key, normalise_prompt, params_hash
from fragjobs.validation import load_thresholds

log = logging.getLogger("fragjobs")

CALIBRATION_PROMPTS = 6
"""Prompts a model-level schedule is calibrated on."""

MIN_CALIBRATION_PROMPTS = 3
"""A base that is not built in needs this many prompts with fragments of their own."""

CALIBRATION_SEED = 20_261_203
"""Draws the built-ins' calibration scenes (any fixed seed: none is tuned)."""

CALIBRATION_RULE = 2
"""How calibration prompts are chosen (2: the forms users write, with and without size and
background); part of the settings a model-level fragment is found by, so a fragment of an
older rule is built again rather than used."""


@dataclass
class ModelLevel:
    """The base's model-level fragment (``key``), or why there is none (``reason``)."""

    key: str | None
    reason: str | None
    built_s: float = 0.0
    """Seconds this call spent building it (0 when it was in the catalog)."""
    prompts: tuple[str, ...] = ()


@dataclass
class PromptGate:
    """The model-level fragment judged on one prompt (:func:`gate_for_prompt`)."""

    key: str
    passed: bool
    seeds: list[int]
    metrics: Any
    gate: Any
    full_images: torch.Tensor
    fragment_images: torch.Tensor
    kept_profile_id: str
    """Where the full model's images of ``seeds`` are kept (the prompt's own profile id)."""
    elapsed_s: float
    full_s: float
    """Of ``elapsed_s``, the seconds that made the full model's images (delivered)."""
    reason: str | None
    shared_steps: int = 0
    """Steps the full model's images and the fragment's computed once for both."""


def calibration_prompts(ws: Workspace, loaded: LoadedBase, base_model_id: int) -> list[str]:
    """The prompts a model-level schedule of this base is calibrated on.

    A built-in base (all are trained on, or sized for, the shapes vocabulary): captions of
    :data:`CALIBRATION_PROMPTS` scenes drawn with :data:`CALIBRATION_SEED`. Any other base:
    the prompts of its own per-prompt fragments in the catalog, newest first (the library
    teaches the model-level schedule; none of them is the prompt being run, whose fragment
    does not exist yet).
    """
    if loaded.info.source.startswith("builtin:"):
        return builtin_calibration_prompts()
    rows = ws.catalog.list_fragments(base_model_id=base_model_id)
    own = [r for r in sorted(rows, key=lambda r: r.created_at, reverse=True) if not _shared(r)]
    return list(dict.fromkeys(r.prompt for r in own))[:CALIBRATION_PROMPTS]


def builtin_calibration_prompts() -> list[str]:
    """Captions of :data:`CALIBRATION_PROMPTS` scenes of the shapes vocabulary, drawn with
    :data:`CALIBRATION_SEED` (the same on every call), in the forms users write them: the
    background phrase is named in every other caption and the size word in two of every four
    (a prompt without them leaves the model to choose, so its seeds vary more and the shared
    schedule must hold on them too)."""
    from fragjobs.builtin.captions import plain_caption
    from fragjobs.builtin.scenes import sample_specs

    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    specs = sample_specs(4 * CALIBRATION_PROMPTS, generator, held_out=None, jitter=False)
    random.Random(CALIBRATION_SEED).shuffle(specs)
    captions: list[str] = []
    for spec in specs:
        i = len(captions)
        text = plain_caption(spec, size=i % 4 < 2, background=i % 2 == 0)
        if text not in captions:
            captions.append(text)
        if len(captions) == CALIBRATION_PROMPTS:
            break
    return captions


def model_level_fragment(ws: Workspace, knobs: ChainKnobs, *, progress: bool = False) -> ModelLevel:
    """This base's model-level fragment for ``knobs``' extraction settings, built when there
    is none (module docstring). Never raises for a base that cannot have one: ``reason``
    says why (no caching, too few calibration prompts, no schedule kept the fidelity, its
    gate failed on its own prompt)."""
    if not knobs.caching:
        return ModelLevel(None, "caching is off: a model-level fragment is a caching schedule")
    loaded = base(knobs.model, ws.settings)
    info = loaded.info
    base_row = ws.catalog.get_or_create_base_model(info.name, info.sha256, info.source)
    wanted = _settings_signature(knobs, loaded)
    existing = _existing(ws, base_row.id, wanted)
    if existing is not None:
        return existing
    with write_lock(ws, f"model-level:{info.sha256}:{params_hash(wanted)[:12]}"):
        existing = _existing(ws, base_row.id, wanted)
        if existing is not None:
            return existing
        started = time.perf_counter()
        prompts = calibration_prompts(ws, loaded, base_row.id)
        if len(prompts) < MIN_CALIBRATION_PROMPTS:
            return ModelLevel(
                None,
                f"a model-level fragment of {info.name} needs {MIN_CALIBRATION_PROMPTS} prompts "
                f"with fragments of their own on it, it has {len(prompts)}",
            )
        profiles = [
            profile(
                p,
                model=knobs.model,
                seeds=knobs.profile_seeds,
                steps=knobs.steps,
                ws=ws,
                progress=progress,
            )
            for p in prompts
        ]
        config = _extraction_config(knobs, loaded)
        first = profiles[0]
        params = {
            **config.params(first.profile),
            "model_level": {
                **wanted,
                "prompts": prompts,
                "profile_ids": [p.profile_id for p in profiles],
            },
        }
        key = make_fragment_key(info.name, first.profile.prompt, params)
        fragment, _unet = extract_model_level_fragment(
            loaded.pipe,
            info,
            [p.profile for p in profiles],
            config,
            profile_id=first.profile_id,
            key=key,
        )
        prof_row = ws.catalog.get_profile(first.profile_id)
        store_fragment(ws, fragment, prof_row, base_row.id, params, started)
        val = validate(key, seeds=knobs.validation_seeds, ws=ws, progress=progress)
        built = time.perf_counter() - started
    routing = fragment.manifest.dynamic_routing
    if not routing.enabled:
        return ModelLevel(
            None, f"model-level fragment {key}: {routing.reason}", built, tuple(prompts)
        )
    if not val.passed:
        return ModelLevel(
            None,
            f"model-level fragment {key} failed its gate: {gate_reason(val.gate)}",
            built,
            tuple(prompts),
        )
    return ModelLevel(key, None, built, tuple(prompts))


def gate_for_prompt(
    ws: Workspace, key: str, prompt: str, knobs: ChainKnobs, *, progress: bool = False
) -> PromptGate:
    """The model-level fragment ``key`` against the full model on ``prompt``'s validation
    seeds, by the gate of ``thresholds.yaml`` (module docstring)."""
    normalise_prompt(prompt)
    thresholds = load_thresholds(ws.settings.thresholds_path)
    started = time.perf_counter()
    row = ws.catalog.get_fragment(key)
    loaded = base(knobs.model, ws.settings)
    manifest, unet = warm_fragment_unet(ws, loaded, row)
    seeds = list(knobs.validation_seeds)
    gen = generation_config(manifest, batch_size=len(seeds))
    own = profile_config_of(loaded.info, knobs.profile_seeds, knobs.steps)
    kept_id = profile_id_of(loaded.info, prompt, own)  # the prompt's own chain's profile id
    spec = FullImageSpec.of(loaded.info.sha256, prompt, gen)
    images = gate_images(
        ws, loaded.pipe, unet, manifest, kept_id, spec, seeds, gen, progress=progress
    )
    full, frag = images.full, images.fragment
    metrics = quality(ws, loaded, full, frag, prompt)
    gate, layer = judge(metrics, thresholds, seeds)
    ws.catalog.add_validation(
        key, {"prompt": prompt.strip(), **layer.model_dump(mode="json")}, gate.passed
    )
    return PromptGate(
        key,
        gate.passed,
        seeds,
        metrics,
        gate,
        full,
        frag,
        kept_id,
        elapsed_s=time.perf_counter() - started,
        full_s=images.full_s,
        reason=None if gate.passed else gate_reason(gate),
        shared_steps=images.shared_steps,
    )


def _settings_signature(knobs: ChainKnobs, loaded: LoadedBase) -> dict[str, Any]:
    """What a model-level fragment must share with the run to be used for it."""
    config = _extraction_config(knobs, loaded)
    signature = {
        "caching": config.caching.params() if config.caching else None,
        "int8": asdict(config.int8) if config.int8 else None,
        "low_rank": asdict(config.low_rank) if config.low_rank else None,
        "steps": knobs.steps or loaded.info.default_steps,
        "profile_seeds": list(knobs.profile_seeds),
        "calibration": CALIBRATION_RULE,
    }
    return json.loads(json.dumps(signature))  # as the catalog gives it back (lists, not tuples)


def _extraction_config(knobs: ChainKnobs, loaded: LoadedBase) -> ExtractionConfig:
    """``knobs``' extraction config, without int8 where int8 layers would compute as float.

    There (every device measured so far, see
    :func:`~fragjobs.extraction.int8_exec.int8_computes_as_float`) int8 buys nothing at run
    time: the layers are dequantised once at load, into copies of their own, so the fragment
    is as fast, holds more memory and is further from the full model. Without weight edits
    the fragment also computes its warm-up steps exactly as the full model does, and its
    gate shares them (:mod:`fragjobs.chain.gate_images`).
    """
    config = knobs.extraction_config()
    as_float = int8_computes_as_float(denoiser(loaded.pipe))
    return replace(config, int8=None) if as_float else config


def _shared(row: Any) -> bool:
    return isinstance(row.params, dict) and "model_level" in row.params


def _existing(ws: Workspace, base_model_id: int, wanted: dict[str, Any]) -> ModelLevel | None:
    """The ready model-level fragment of these settings, or one that failed (its reason)."""
    for row in ws.catalog.list_fragments(base_model_id=base_model_id):
        if not _shared(row):
            continue
        recorded = {k: v for k, v in row.params["model_level"].items() if k in wanted}
        if recorded != wanted:
            continue
        prompts = tuple(row.params["model_level"].get("prompts", ()))
        if row.status == "ready":
            routing = read_manifest(ws, row).dynamic_routing
            if not routing.enabled:
                return ModelLevel(None, f"model-level fragment {row.key}: {routing.reason}")
            return ModelLevel(row.key, None, 0.0, prompts)
        if row.status == "failed_gate":
            return ModelLevel(
                None,
                f"model-level fragment {row.key} is {row.status}"
                + (f" ({row.status_reason})" if row.status_reason else ""),
                0.0,
                prompts,
            )
    return None


@dataclass
class SharedAttempt:
    """What :func:`try_model_level` found: the fragment (or why none) and its gate here."""

    level: ModelLevel
    gate: PromptGate | None

    @property
    def row(self) -> dict[str, Any]:
        """The attempt's row in the report (the fields of the gate ladder's rows); only for
        a fragment that was gated on the prompt (``gate`` set)."""
        gate = self.gate
        return {
            "key": self.level.key,
            "model_level": True,
            "heads_kept": None,
            "heads_total": None,
            "caching_min_ssim": None,
            "passed": gate.passed,
            **gate_figures(gate.metrics),
            "gate_reason": gate.reason,
            "extract_s": round(self.level.built_s, 4),
            "validate_s": round(gate.elapsed_s, 4),
        }

    def to_json(self, used_key: str) -> dict[str, Any]:
        """The report's ``model_level`` section."""
        gate = self.gate
        return {
            "key": self.level.key,
            "used": self.level.key is not None and used_key == self.level.key,
            "reason": self.level.reason if gate is None else gate.reason,
            "built_s": round(self.level.built_s, 4),
            "calibration_prompts": list(self.level.prompts),
            "gate_s": None if gate is None else round(gate.elapsed_s, 4),
            "gate_full_model_s": None if gate is None else round(gate.full_s, 4),
            "gate_seeds": None if gate is None else gate.seeds,
            "gate_shared_steps": None if gate is None else gate.shared_steps,
        }


def try_model_level(
    ws: Workspace, prompt: str, knobs: ChainKnobs, *, progress: bool = False
) -> SharedAttempt:
    """The base's model-level fragment (built when missing) gated on ``prompt``."""
    level = model_level_fragment(ws, knobs, progress=progress)
    if level.key is None:
        log.info("no model-level fragment: %s", level.reason)
        return SharedAttempt(level, None)
    gate = gate_for_prompt(ws, level.key, prompt, knobs, progress=progress)
    if not gate.passed:
        log.warning(
            "model-level fragment %s failed its gate on %r: %s", level.key, prompt, gate.reason
        )
    return SharedAttempt(level, gate)
