"""The whole chain with a report: profile → extract + validate (ladder) → measure → generate."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fragjobs.chain.fragments import fragment_unet, load_stored_fragment, record_performance
from fragjobs.chain.generate_step import GenerationResult, generate
from fragjobs.chain.knobs import ChainKnobs
from fragjobs.chain.ladder import extract_and_validate
from fragjobs.chain.profile_step import profile
from fragjobs.chain.reuse import measure_reuse
from fragjobs.chain.stored import read_manifest
from fragjobs.chain.validate_step import fragment_base, generation_config
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.generation import measure_latency_ms, memory_report, with_unet
from fragjobs.keys import generation_object, normalise_prompt
from fragjobs.manifest import PerformanceLayer
from fragjobs.reports import build_metrics_summary, save_compare_image
from fragjobs.validation import load_thresholds

DEFAULT_OUT_DIR = "fragjobs-out"


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
    knobs: ChainKnobs | None = None,
    *,
    out_dir: Path | str = DEFAULT_OUT_DIR,
    ws: Workspace | None = None,
    progress: bool = True,
    **knob_values: Any,
) -> RunReport:
    """Profile, extract, validate, measure and generate; write the run's report files.

    ``knobs`` (or the same knobs as keyword arguments: ``model=``, ``variants=``,
    ``threshold=``, ``fidelity=``, ``caching=``, ...; see :class:`ChainKnobs`) say what to
    do; whatever is not given comes from the settings. ``out_dir`` receives
    ``fragment_manifest.json``, ``head_importance.json``, ``metrics_summary.json``,
    ``images/<seed>.png`` and ``compare.png``. H4 and H5 use timings measured in this run
    (full vs fragment, same steps, same batch, warm).

    Raises:
        InvalidInputError: a bad prompt or knob (nothing is written).
    """
    ws = ws or workspace()
    normalise_prompt(prompt)
    if knobs is None:
        knobs = ChainKnobs.from_settings(ws.settings, **knob_values)
    elif knob_values:
        knobs = knobs.replace(**knob_values)
    out = Path(out_dir)
    model = knobs.model

    t0 = time.perf_counter()
    prof = profile(
        prompt,
        model=model,
        seeds=knobs.profile_seeds,
        steps=knobs.steps,
        ws=ws,
        progress=progress,
    )
    t1 = time.perf_counter()
    ext, val, attempts = extract_and_validate(
        prof.profile_id,
        knobs.extraction_config(),
        seeds=knobs.validation_seeds,
        ws=ws,
        model=model,
        progress=progress,
    )
    t2 = t1 + sum(a["extract_s"] for a in attempts)
    t3 = t2 + sum(a["validate_s"] for a in attempts)

    loaded = fragment_base(ws, ext.key)
    fragment = load_stored_fragment(ext.key, ws)
    frag_unet = fragment_unet(loaded, fragment)
    gen = generation_config(fragment.manifest, batch_size=min(knobs.batch_size, knobs.variants))
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
    paraphrases = list(knobs.paraphrases)
    reuse = measure_reuse(ext.key, paraphrases, ws=ws) if paraphrases else None
    manifest = read_manifest(ws, ws.catalog.get_fragment(ext.key))

    result = generate(
        prompt,
        variants=knobs.variants,
        model=model,
        key=ext.key,
        batch_size=knobs.batch_size,
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
    summary["knobs"] = knobs.to_json()

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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
