"""The whole chain with a report: profile → extract + validate (ladder) → measure → generate.

Nothing the chain computes for the variants is wasted: the full model's images of the
profiling seeds and of the validation seeds are the first variants delivered, and the
fragment generates only the rest, on seeds neither step used
(:func:`~fragjobs.chain.knobs.variant_seeds`). Break-even (H5) counts the seconds of
profile + extract + validate beyond delivering those images, each credited at the full
model's per-image time (:mod:`fragjobs.validation.break_even`), with the seed's definition
(all of it) beside it. The latency measurement and the memory probe are measurements for the
report, not costs of delivering variants: neither definition counts them.

Every run writes a report folder ``<reports root>/YYYY-MM-DD_HHMM[-n]/``
(:mod:`fragjobs.reports.builder`); the root is ``<data dir>/reports`` unless given.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fragjobs.base_identity import model_source
from fragjobs.base_models import LoadedBase
from fragjobs.chain.fragments import fragment_unet, load_stored_fragment, record_performance
from fragjobs.chain.generate_step import GenerationResult, generate
from fragjobs.chain.knobs import ChainKnobs, variant_seeds
from fragjobs.chain.ladder import after_failed_model_level, extract_and_validate
from fragjobs.chain.model_level import try_model_level
from fragjobs.chain.profile_step import profile
from fragjobs.chain.reuse import measure_reuse
from fragjobs.chain.stored import read_manifest, store_of
from fragjobs.chain.validate_step import fragment_base, generation_config
from fragjobs.chain.workspaces import Workspace, workspace
from fragjobs.errors import FragjobsError, InvalidInputError
from fragjobs.families import denoiser
from fragjobs.generation import (
    GenerationConfig,
    interleaved_latency_ms,
    memory_report,
    with_unet,
)
from fragjobs.generation.memory_probe import measure as probe_memory
from fragjobs.generation.memory_probe import peak_figure
from fragjobs.keys import (
    FRAGMENT_FILE,
    MANIFEST_FILE,
    fragment_object,
    generation_object,
    normalise_prompt,
)
from fragjobs.manifest import FragmentManifest, PerformanceLayer
from fragjobs.reports import (
    RunData,
    build_metrics_summary,
    default_reports_root,
    read_report,
    write_run_report,
)
from fragjobs.validation import load_thresholds


@dataclass
class RunReport:
    """What ``run`` did: its report folder (``out_dir``), the fragment and where it is stored."""

    out_dir: Path
    key: str
    passed: bool
    summary: dict[str, Any]
    generation: GenerationResult
    stored_at: str


def run(
    prompt: str,
    knobs: ChainKnobs | None = None,
    *,
    out_dir: Path | str | None = None,
    ws: Workspace | None = None,
    progress: bool = True,
    measure_memory: bool = True,
    **knob_values: Any,
) -> RunReport:
    """Profile, extract, validate, measure and generate; write the run's report folder.

    ``knobs`` (or the same knobs as keyword arguments: ``model=``, ``variants=``,
    ``threshold=``, ``fidelity=``, ``caching=``, ...; see :class:`ChainKnobs`) say what to
    do; whatever is not given comes from the settings. ``out_dir`` is the reports root
    (default ``<data dir>/reports``): the run writes a new ``YYYY-MM-DD_HHMM[-n]/`` folder
    in it (:mod:`fragjobs.reports.builder` lists its files). H4 and H5 use timings measured
    in this run (full vs fragment, same steps, same batch, warm, timed in interleaved rounds:
    :func:`~fragjobs.generation.interleaved_latency_ms`); H2 uses the peak memory of
    one batch, each model in a fresh process (``measure_memory=False``: not measured, H2
    UNAVAILABLE).

    The ``variants`` images are the full model's images of the profiling seeds, then of the
    validation seeds, then the fragment's on new seeds (module docstring); the report's
    ``delivery`` says which seed came from which model.

    Raises:
        InvalidInputError: a bad prompt or knob, or validation seeds that are not held out
            from profiling (nothing is written).
    """
    ws = ws or workspace()
    normalise_prompt(prompt)
    if knobs is None:
        knobs = ChainKnobs.from_settings(ws.settings, **knob_values)
    elif knob_values:
        knobs = knobs.replace(**knob_values)
    root = Path(out_dir) if out_dir is not None else default_reports_root(ws.settings)
    model = knobs.model
    profiled = sorted(set(knobs.profile_seeds) & set(knobs.validation_seeds))
    if profiled:
        raise InvalidInputError(
            f"validation seeds must be held out from profiling: {profiled} are in both"
        )
    seeds = variant_seeds(knobs.profile_seeds, knobs.validation_seeds, knobs.variants)

    load_thresholds(ws.settings.thresholds_path)  # a malformed gate file: refused before work
    shared = try_model_level(ws, prompt, knobs, progress=progress) if knobs.model_level else None
    if shared is not None and shared.gate is not None and shared.gate.passed:
        prof, key, val = None, shared.level.key, shared.gate
        attempts = [shared.row]
        seeds = variant_seeds(knobs.validation_seeds, (), knobs.variants)
        kept_profile_id = shared.gate.kept_profile_id
        steps_s = {"profile_s": 0.0, "extract_s": shared.level.built_s, "validate_s": val.elapsed_s}
        profile_reused, fragment_reused = False, shared.level.built_s == 0.0
    else:
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
        config = knobs.extraction_config()
        if shared is not None and shared.gate is not None:  # it failed this prompt's gate
            config = after_failed_model_level(config)
        with _working("extract + validate (gate ladder)", progress):
            ext, val, attempts = extract_and_validate(
                prof.profile_id,
                config,
                seeds=knobs.validation_seeds,
                ws=ws,
                model=model,
                progress=progress,
            )
        key, kept_profile_id = ext.key, None
        steps_s = {
            "profile_s": t1 - t0,
            "extract_s": sum(a["extract_s"] for a in attempts),
            "validate_s": sum(a["validate_s"] for a in attempts),
        }
        profile_reused, fragment_reused = prof.reused, ext.reused
        if shared is not None:  # its seconds count: they were spent before this chain
            steps_s["extract_s"] += shared.level.built_s
            if shared.gate is not None:  # it was tried on this prompt and failed
                attempts.insert(0, shared.row)
                steps_s["validate_s"] += shared.gate.elapsed_s

    loaded = fragment_base(ws, key)
    fragment = load_stored_fragment(key, ws)
    frag_unet = fragment_unet(loaded, fragment)
    gen = generation_config(fragment.manifest, batch_size=min(knobs.batch_size, knobs.variants))
    with _working(
        "measure latency: full model and each fragment", progress, len(attempts) + 1
    ) as bar:
        full_ms, frag_ms = interleaved_latency_ms(
            [loaded.pipe, with_unet(loaded.pipe, frag_unet)], prompt, gen
        )
        bar.update(2)
        for attempt in attempts[:-1]:
            if attempt.get("model_level"):  # failed on this prompt: not measured
                attempt["speedup"] = None
                bar.update(1)
                continue
            attempt["speedup"] = _speedup_of(ws, loaded, attempt["key"], prompt, gen)
            bar.update(1)
    latency_full, latency_frag = statistics.median(full_ms), statistics.median(frag_ms)
    attempts[-1]["speedup"] = round(latency_full / latency_frag, 4)
    device = f"{loaded.pipe.device.type}: {_device_name(loaded.pipe.device)}"
    memory = memory_report(denoiser(loaded.pipe), frag_unet)
    if measure_memory:
        with _working("measure memory: one batch per model in a fresh process", progress, 2) as bar:
            memory.update(_probe_peaks(ws, loaded, fragment.manifest, prompt, gen, bar))
    else:
        memory["peak_reason"] = "memory not measured in this run (measure_memory=False)"
    performance = PerformanceLayer(
        device=device,
        steps=gen.steps,
        batch_size=gen.batch_size,
        measured_latency_full_ms=round(latency_full, 3),
        measured_latency_fragment_ms=round(latency_frag, 3),
        measured_speedup=round(latency_full / latency_frag, 4),
        memory_kind=memory.get("peak_kind"),
        measured_peak_full_bytes=memory.get("peak_full_bytes"),
        measured_peak_fragment_bytes=memory.get("peak_fragment_bytes"),
    )
    if shared is None or key != shared.level.key:  # the model-level one: its own run's figures
        record_performance(key, performance, ws)
    paraphrases = list(knobs.paraphrases)
    reuse = None
    if paraphrases:
        with _working(f"reuse: gate on {len(paraphrases)} paraphrase(s)", progress):
            reuse = measure_reuse(
                key, paraphrases, ws=ws, prompt=prompt.strip() if prof is None else None
            )
    row = ws.catalog.get_fragment(key)
    manifest = read_manifest(ws, row)

    result = generate(
        prompt,
        seeds=seeds,
        model=model,
        key=key,
        batch_size=knobs.batch_size,
        ws=ws,
        progress=progress,
        reuse_full_model=True,
        kept_profile_id=kept_profile_id,
    )
    thresholds = load_thresholds(ws.settings.thresholds_path)
    summary = build_metrics_summary(
        quality=val.metrics,
        gate=val.gate,
        thresholds=thresholds,
        performance={
            "latency_full_ms": latency_full,
            "latency_fragment_ms": latency_frag,
            "latency_full_ms_range": [min(full_ms), max(full_ms)],
            "latency_fragment_ms_range": [min(frag_ms), max(frag_ms)],
            "latency_repeats": len(full_ms),
            "batch_size": gen.batch_size,
            "steps": gen.steps,
            "overhead_s": sum(steps_s.values()),
            "chain_s": sum(steps_s.values()),
            "delivered_full_model_images": len(result.reused_seeds),
            **steps_s,
            # a rerun reads profile and fragment back from the store: its overhead is small
            "profile_reused": profile_reused,
            "fragment_reused": fragment_reused,
        },
        memory=memory,
        reuse=reuse,
        model=loaded.info.name,
        prompt=prompt.strip(),
        device=device,
    )
    summary["fragment"] = {
        "key": key,
        "verified": manifest.verified,
        "used_for_generation": not result.used_fallback,
        "fallback_reason": result.fallback_reason,
        "job_id": result.job_id,
        "attempts": attempts,
        "stored_at": row.storage_uri,
    }
    summary["delivery"] = delivery_summary(result, knobs)
    summary["knobs"] = knobs.to_json()
    summary["model_level"] = None if shared is None else shared.to_json(key)
    notes = []
    if result.used_fallback:
        notes.append(f"variants generated with the full model: {result.fallback_reason}")
    if shared is not None and shared.level.built_s > 0:
        notes.append(
            f"built the base's model-level fragment {shared.level.key or ''} in "
            f"{shared.level.built_s:.1f} s (once per base; counted in this run's break-even)"
        )
    if shared is not None and shared.level.key is None:
        notes.append(f"no model-level fragment: {shared.level.reason}")
    if prof is None:
        notes.append(
            f"the prompt was not profiled: the model-level fragment {key} passed its gate on "
            f"seeds {val.seeds}, so no fragment of its own was extracted"
        )
    elif not manifest.verified:
        notes.append("the fragment failed its quality gate: manifest says verified: false")
    images = {
        seed: ws.store.get_bytes(generation_object(result.job_id, f"{seed}.png"))
        for seed in result.seeds
    }
    with _working("report: files, plots, regression diff, index.html", progress):
        folder = write_run_report(
            root,
            RunData(
                summary=summary,
                manifest=manifest,
                head_importance=None if prof is None else prof.profile.importance_document(),
                profile=None if prof is None else prof.profile,
                profile_id=None if prof is None else prof.profile_id,
                images=images,
                compare=(val.full_images, val.fragment_images, val.seeds),
                notes=notes,
            ),
            thresholds,
            thresholds_source=str(ws.settings.thresholds_path or "packaged thresholds.yaml"),
        )
    written = read_report(folder).summary
    return RunReport(folder, key, val.passed, written, result, row.storage_uri)


def delivery_summary(result: GenerationResult, knobs: ChainKnobs) -> dict[str, Any]:
    """Which variant came from which model: the report's ``delivery`` section."""
    kept = set(result.reused_seeds)
    return {
        "variants": len(result.seeds),
        "seeds": list(result.seeds),
        "full_model_seeds": list(result.full_model_seeds),
        "fragment_seeds": [s for s in result.seeds if s not in set(result.full_model_seeds)],
        "from_profiling": [s for s in result.seeds if s in kept and s in knobs.profile_seeds],
        "from_validation": [s for s in result.seeds if s in kept and s in knobs.validation_seeds],
        "fragment_key": result.fragment_key,
        "job_id": result.job_id,
    }


def _speedup_of(
    ws: Workspace, loaded: LoadedBase, key: str, prompt: str, gen: GenerationConfig
) -> float:
    """Measured speed-up of another fragment of the ladder, interleaved with the full model."""
    unet = fragment_unet(loaded, load_stored_fragment(key, ws))
    full_ms, frag_ms = interleaved_latency_ms(
        [loaded.pipe, with_unet(loaded.pipe, unet)], prompt, gen
    )
    return round(statistics.median(full_ms) / statistics.median(frag_ms), 4)


def _probe_peaks(
    ws: Workspace,
    loaded: LoadedBase,
    manifest: FragmentManifest,
    prompt: str,
    gen: GenerationConfig,
    bar: Any,
) -> dict[str, Any]:
    """Peak memory of one batch of the full model and of the fragment, each in a fresh
    process (:mod:`fragjobs.generation.memory_probe`); on failure, the reason instead."""
    common = {
        "prompt": prompt,
        "steps": gen.steps,
        "size": gen.height if gen.height == gen.width else None,
        "batch_size": gen.batch_size,
        "data_dir": ws.settings.data_dir,
        "device": ws.settings.device,
    }
    source = model_source(loaded.info.source, loaded.info.name)
    try:
        full = probe_memory(source, **common)
        bar.update(1)
        store = store_of(ws, ws.catalog.get_fragment(manifest.key))  # shared or node-local
        with tempfile.TemporaryDirectory(prefix="fragjobs-probe-") as folder:
            for filename in (FRAGMENT_FILE, MANIFEST_FILE):
                name = fragment_object(manifest.base_model.name, manifest.key, filename)
                (Path(folder) / filename).write_bytes(store.get_bytes(name))
            frag = probe_memory(source, fragment_dir=Path(folder), **common)
        bar.update(1)
    except FragjobsError as exc:
        return {"peak_reason": f"memory probe failed: {exc}"}
    (peak_full, kind), (peak_frag, _) = peak_figure(full), peak_figure(frag)
    return {"peak_full_bytes": peak_full, "peak_fragment_bytes": peak_frag, "peak_kind": kind}


@contextlib.contextmanager
def _working(desc: str, enabled: bool, total: int | None = None) -> Iterator[Any]:
    """A progress bar for a step that reports no progress of its own: it says what is being
    done and how long it has taken, with a count when ``total``. On a terminal the elapsed
    time is refreshed every second (not in a log, which would get a line per second)."""
    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticking = enabled and sys.stderr.isatty()
    if ticking:
        ticker.start()
    try:
        yield bar
    finally:
        stop.set()
        if ticking:
            ticker.join()
        bar.close()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
