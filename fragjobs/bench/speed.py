"""Benchmark: full model vs fragments vs training-free peers, in one run.

``python -m fragjobs.bench`` profiles the prompt once per model, then times, with the same
prompt, steps, batch and seeds, warm, median of ``--repeats`` rounds (interleaved: each round
times every method once, so a shared machine's drift hits all alike):

* ``full``: the base pipeline;
* fragments with each technique alone (``heads``, ``low_rank``, ``int8``, ``caching``) and
  ``all`` together (the chain's own config), or any combination joined by ``+``
  (``low_rank+int8+caching``: the chain's config without head pruning); ``name@0.95``
  extracts with another fidelity knob (e.g. ``caching@0.95,all@0.95`` for the fastest
  schedule keeping SSIM 0.95);
* peers (:mod:`fragjobs.bench.peers`): DeepCache (intervals 2, 3, 5), ToMe-SD (ratios 0.3,
  0.5) and diffusers' cache hooks fitted to the denoiser, a UNet or a transformer
  (TaylorSeer, Pyramid Attention Broadcast, MagCache calibrated on the profiling seeds,
  FasterCache, First-Block-Cache), at two or three settings each; a peer that is not
  installed or cannot run on the pipeline (DeepCache and ToMe on a transformer) is a row
  saying why, without figures.

Models: any the chain takes (``tiny-sd``, ``shapes``, ``sd15-shape``, the SDXL built-ins
``tiny-sdxl`` and ``sdxl-shape``, the PixArt ones where this fragjobs has them, a folder or
hub id). ``--size`` sets the side of the timing models; the test models (``tiny-*``,
``shapes``) keep theirs, and the table says when a model ran below its native size. A step
that does not fit in the memory left beside the loaded model is a row or note saying so,
with the figures (:mod:`fragjobs.bench.headroom`): on a 24 GB machine ``sdxl-shape``
(12.7 GB loaded) is timed with its peers, but extracting a fragment (a 10.3 GB copy of its
UNet) does not fit. Before the memory probes the benchmark releases its own copy of the
model, so that each probe's process has the room.

Method tokens ``noforecast``, ``nocfg``, ``noprobe`` in a ``+``-joined fragment method turn
off block caching's routing switches (``BlockCachingConfig.forecast``, ``.cfg_reuse``,
``.probe``): ``caching+noforecast+nocfg+noprobe`` is plain block caching.

For each: per-image latency (median of the repeats, with min, max and a flag when max/min >
:data:`fragjobs.bench.timing.SPREAD_LIMIT`), speed-up vs full, SSIM and PSNR of its images
against the full model's at the same seeds, UNet weight bytes, CUDA peak memory on a GPU,
and the RSS held and peak RSS of a fresh process that loads only that method and makes one
batch (:mod:`fragjobs.bench.memory`; each fragment is saved under ``--out/fragments/<model>/``).
Break-even of each fragment (H5), both definitions of :mod:`fragjobs.validation.break_even`:
old = (profile + extract + validate seconds) / (full − fragment seconds per image);
delivered = the same seconds beyond delivering the full-model images they computed (the
profiling and evaluation seeds') / the same saving; profiling on the chain's four seeds and
validation as ``fragjobs validate`` does it (full model and fragment on the evaluation seeds).
Writes JSON, a markdown table with each peer's dominating fragment point, and a speed-up vs
SSIM plot (mean and worst seed). On random-weight models SSIM is reported
but says nothing about quality. Ratios are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fragjobs.bench import model_level_row
from fragjobs.bench.diffusers_cache import PeerUnavailableError
from fragjobs.bench.headroom import pipeline_bytes, shortfall
from fragjobs.bench.loading import load_for_bench
from fragjobs.bench.memory import measure
from fragjobs.bench.methods import (
    TECHNIQUES,
    check_methods,
    extraction_config,
    is_fragment_method,
    is_model_level,
    method_fidelity,
)
from fragjobs.bench.peers import (
    NEEDS_CALIBRATION,
    PEERS,
    calibrate_peer,
    describe_peer,
    is_peer,
    missing_package,
    parse_peer,
    peer_pipeline,
)
from fragjobs.bench.speed_report import markdown_report, plot
from fragjobs.bench.timing import time_interleaved
from fragjobs.errors import InvalidInputError
from fragjobs.families import denoiser
from fragjobs.validation.break_even import break_even_delivered, break_even_old

FIXED_SIZE = ("tiny-sd", "shapes", "tiny-sdxl", "tiny-pixart")  # test models, 64×64


def bench_model(
    model: str,
    *,
    threshold: float,
    fidelity: float,
    steps: int | None,
    size: int | None,
    batch_size: int,
    repeats: int,
    prompt: str,
    methods: tuple[str, ...],
    profile_seeds: tuple[int, ...] = (0, 1, 2, 3),
    eval_seeds: int | None = None,
    interleave: bool = True,
    fragments_dir: Path | None = None,
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every method on one model; returns ``{"model", ..., "rows": [...]}``.

    ``fragments_dir``: each fragment is saved there (``<method>/``); with ``memory``, each
    method's RSS is then measured in a process of its own (:mod:`fragjobs.bench.memory`).
    Fragment methods whose extraction does not fit beside the model are rows saying so (the
    prompt is then not profiled: ``profile_s`` is null); a probe that does not fit leaves
    its row an ``rss_note`` instead of RSS figures.
    """
    from fragjobs.extraction import extract_fragment, save_fragment, weight_bytes
    from fragjobs.generation import generate_images, with_unet
    from fragjobs.generation.memory import release_freed_heap
    from fragjobs.profiling import ProfileConfig, profile_prompt
    from fragjobs.validation import compute_quality

    check_methods(methods, threshold, fidelity)
    loaded, gen = load_for_bench(model, size=size, steps=steps, batch_size=batch_size)
    pipe, info = loaded.pipe, loaded.info
    height, width, steps = gen.height, gen.width, gen.steps
    eval_seeds = list(range(100, 100 + (eval_seeds or batch_size)))
    model_module = denoiser(pipe)
    device = next(model_module.parameters()).device
    full_bytes, whole_bytes = weight_bytes(model_module), pipeline_bytes(pipe)
    no_room = shortfall(
        full_bytes, device, f"extracting a fragment (a copy of the {type(model_module).__name__})"
    )
    prof, profile_s = None, None
    profile_config = ProfileConfig(
        seeds=profile_seeds,
        steps=steps,
        step_stride=2,
        guidance_scale=info.default_guidance,
        height=height,
        width=width,
    )
    if no_room is None and any(is_fragment_method(name) for name in methods):
        started = time.perf_counter()
        prof = profile_prompt(pipe, prompt, profile_config, progress=False)
        profile_s = time.perf_counter() - started
    started = time.perf_counter()
    full_images = generate_images(pipe, prompt, eval_seeds, gen)
    full_eval_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    runners: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}

    def add(name: str, runner: Callable, unet_bytes: int, extra: dict[str, Any]) -> None:
        with runner() as run_pipe:
            started = time.perf_counter()
            images = generate_images(run_pipe, prompt, eval_seeds, gen)
            quality = compute_quality(full_images, images, prompt)
            # what `fragjobs validate` does: full and fragment on the same seeds, then metrics
            validate_s = full_eval_s + time.perf_counter() - started
        row = {
            "method": name,
            "ssim": round(quality.ssim, 4),
            "ssim_min": round(min(quality.ssim_per_image), 4),
            "psnr_db": round(quality.psnr_db, 2),
            "unet_bytes": unet_bytes,
            "bytes_ratio": round(unet_bytes / full_bytes, 3),
            **extra,
        }
        if "extract_s" in extra:
            row["validate_s"] = round(validate_s, 3)
        rows.append(row)
        runners[name] = runner
        if not interleave:
            time_interleaved(rows[-1:], runners, prompt, gen, repeats)
            runners.pop(name)
            log(json.dumps({"model": model, **rows[-1]}))

    add("full", lambda: contextlib.nullcontext(pipe), full_bytes, {})
    for name in methods:
        technique = name.partition("@")[0]
        if (is_fragment_method(name) or is_model_level(name)) and no_room:
            rows.append({"method": name, "unavailable": no_room})
        elif is_model_level(name):
            try:
                fragment, unet, extra = model_level_row.build(
                    pipe, info, profile_config, method_fidelity(name, fidelity)
                )
            except InvalidInputError as exc:
                rows.append({"method": name, "unavailable": str(exc)})
                continue
            fragment_pipe = with_unet(pipe, unet)
            gate_s, extra["gate_shared_steps"] = model_level_row.gate_seconds(
                pipe, fragment, fragment_pipe, prompt, eval_seeds[: model_level_row.GATE_SEEDS], gen
            )
            extra["gate_s"] = round(gate_s, 3)
            if fragments_dir is not None:
                save_fragment(fragment, fragments_dir / name)
                extra["fragment_dir"] = str(fragments_dir / name)
            add(name, lambda p=fragment_pipe: contextlib.nullcontext(p), weight_bytes(unet), extra)
            del fragment, unet, fragment_pipe
        elif is_fragment_method(name):
            t0 = time.perf_counter()
            fragment, unet = extract_fragment(
                pipe,
                info,
                prof,
                extraction_config(technique, threshold, method_fidelity(name, fidelity)),
                profile_id="bench",
            )
            m = fragment.manifest
            extra = {
                "extract_s": round(time.perf_counter() - t0, 2),
                "fidelity": method_fidelity(name, fidelity),
                "heads_kept": f"{m.pruning.heads_kept}/{m.pruning.heads_total}",
                "caching": m.dynamic_routing.model_dump(
                    include={"enabled", "delta", "shallow_delta", "estimated_cost"}
                ),
            }
            if fragments_dir is not None:
                save_fragment(fragment, fragments_dir / name)
                extra["fragment_dir"] = str(fragments_dir / name)
            fragment_pipe = with_unet(pipe, unet)
            add(name, lambda p=fragment_pipe: contextlib.nullcontext(p), weight_bytes(unet), extra)
            del fragment, unet, fragment_pipe
        else:
            _add_peer(name, pipe, add, rows, full_bytes, steps, profile_seeds, prompt, gen)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if interleave:
        time_interleaved([r for r in rows if r["method"] in runners], runners, prompt, gen, repeats)
        for row in rows:
            log(json.dumps({"model": model, **row}))
    runners.clear()
    # each probe loads the model again in a process of its own: give it this process's room
    loaded = pipe = model_module = prof = full_images = None
    gc.collect()
    release_freed_heap()
    if memory:
        for row in rows:
            fragment_row = "extract_s" in row or "build_s" in row
            if "unavailable" in row or (fragment_row and "fragment_dir" not in row):
                continue
            if is_peer(row["method"]) and parse_peer(row["method"])[0] in NEEDS_CALIBRATION:
                row["rss_note"] = "not probed: its calibration runs in the benchmark process"
                continue
            no_room = shortfall(whole_bytes, device, "a probe (the pipeline loaded again)")
            if no_room is not None:
                row["rss_note"] = no_room
                continue
            figures = measure(
                model,
                prompt=prompt,
                steps=steps,
                size=size,
                batch_size=batch_size,
                fragment_dir=Path(row["fragment_dir"]) if "fragment_dir" in row else None,
                peer=None if row["method"] == "full" or fragment_row else row["method"],
            )
            row["rss_held_mib"] = round(figures["rss_held_bytes"] / 2**20, 1)
            row["rss_peak_mib"] = round(figures["rss_peak_bytes"] / 2**20, 1)
            log(json.dumps({"model": model, "method": row["method"], **figures}))

    _speedups_and_break_even(rows, profile_s, len(profile_seeds) + len(eval_seeds))
    return {
        "model": model,
        "size": height,
        "native_size": info.height,
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
        "profile_s": None if profile_s is None else round(profile_s, 2),
        "profile_seeds": list(profile_seeds),
        "rows": rows,
    }


def _add_peer(name, pipe, add, rows, full_bytes, steps, profile_seeds, prompt, gen) -> None:
    """Calibrate (MagCache), describe and add one peer, or a row saying why it cannot run."""
    from fragjobs.generation import generate_images

    try:
        started = time.perf_counter()
        calibration = calibrate_peer(
            pipe, name, steps, lambda p: generate_images(p, prompt, list(profile_seeds), gen)
        )
        extra = {"calibrate_s": round(time.perf_counter() - started, 2)} if calibration else {}
        extra.update(describe_peer(pipe, name, calibration))
        add(name, lambda: peer_pipeline(pipe, name, calibration), full_bytes, extra)
    except ImportError as exc:
        rows.append({"method": name, "unavailable": missing_package(name, exc)})
    except PeerUnavailableError as exc:
        rows.append({"method": name, "unavailable": str(exc)})


def _speedups_and_break_even(
    rows: list[dict[str, Any]], profile_s: float | None, delivered: int
) -> None:
    """Speed-up of every timed row; both break-evens of every fragment row.

    ``delivered``: the full-model images the chain computed anyway (profiling and evaluation
    seeds), credited by the delivered definition. ``profile_s`` is ``None`` only when no
    fragment was extracted. The model-level fragment's row (``build_s``) counts only its
    per-prompt gate, beyond the gate's own full-model images.
    """
    full_s = rows[0]["latency_ms"] / 1000
    for row in rows:
        if "latency_ms" in row:
            row["speedup"] = round(rows[0]["latency_ms"] / row["latency_ms"], 3)
        if "extract_s" in row:
            overhead = profile_s + row["extract_s"] + row["validate_s"]
            credited = delivered
        elif "build_s" in row and "latency_ms" in row:
            overhead, credited = row["gate_s"], model_level_row.GATE_SEEDS
        else:
            continue
        fragment_s = row["latency_ms"] / 1000
        old = break_even_old(overhead, full_s, fragment_s)
        new = break_even_delivered(overhead, credited, full_s, fragment_s)
        row["break_even_old"] = None if old is None else round(old, 1)
        row["break_even_delivered"] = None if new is None else round(new, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fragjobs.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default="tiny-sd,sd15-shape")
    parser.add_argument("--methods", default=",".join(TECHNIQUES + PEERS))
    parser.add_argument("--threshold", type=float, default=0.75, help="fraction of heads kept")
    parser.add_argument(
        "--fidelity", type=float, default=0.9, help="SSIM the fragment keeps (chain's knob)"
    )
    parser.add_argument(
        "--profile-seeds", type=int, default=4, help="seeds profiled (chain default: 4)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"image side of the timing models (not for {', '.join(FIXED_SIZE)})",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--eval-seeds", type=int, default=None, help="seeds for SSIM/PSNR (default: one batch)"
    )
    parser.add_argument(
        "--no-interleave",
        action="store_true",
        help="time each method right after building it (holds one fragment at a time)",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the per-method RSS probes (a fresh process per method)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="a dog on a jet ski")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    machine += f", torch {torch.__version__}"
    results = []
    for model in (m.strip() for m in args.models.split(",")):
        results.append(
            bench_model(
                model,
                threshold=args.threshold,
                fidelity=args.fidelity,
                steps=args.steps,
                size=None if model in FIXED_SIZE else args.size,
                batch_size=args.batch_size,
                repeats=args.repeats,
                prompt=args.prompt,
                profile_seeds=tuple(range(args.profile_seeds)),
                eval_seeds=args.eval_seeds,
                interleave=not args.no_interleave,
                fragments_dir=args.out / "fragments" / model,
                memory=not args.no_memory,
                methods=tuple(m.strip() for m in args.methods.split(",")),
                log=lambda line: print(line, flush=True),
            )
        )
        report = {"machine": machine, "threshold": args.threshold, "results": results}
        (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    report_md = markdown_report(results, machine)
    (args.out / "bench.md").write_text(report_md)
    plot(results, args.out / "bench.png")
    print(f"\nmedian of {args.repeats}, warm\n{report_md}")
    return 0
