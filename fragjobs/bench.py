"""Benchmark: full model vs fragments vs training-free peers, in one run.

``python -m fragjobs.bench`` profiles the prompt once per model, then times, with the same
prompt, steps, batch and seeds, warm, median of ``--repeats``:

* ``full``: the base pipeline;
* fragments with each technique alone (``heads``, ``low_rank``, ``int8``, ``caching``) and
  ``all`` together;
* peers: DeepCache (``DeepCacheSDHelper``, intervals 3 and 5) and ToMe-SD (ratio 0.5), when
  installed (``pip install deepcache tomesd``), else a row saying why not.

For each: per-image latency, speed-up vs full, SSIM and PSNR of its images against the full
model's at the same seeds, UNet weight bytes, CUDA peak memory on a GPU. Break-even for the
``all`` fragment = (profile + extract seconds) / (full − fragment seconds per image). Writes
JSON, a markdown table and a speed-up vs SSIM plot. On random-weight models SSIM is reported
but says nothing about quality. Ratios are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fragjobs.config import Settings

TECHNIQUES = ("heads", "low_rank", "int8", "caching", "all")
PEERS = ("deepcache_3", "deepcache_5", "tome_0.5")
FIXED_SIZE = ("tiny-sd", "shapes")  # trained/built for 64×64


def _extraction_config(technique: str, threshold: float, fidelity: float):
    from fragjobs.extraction import (
        BlockCachingConfig,
        ExtractionConfig,
        HeadSelectionConfig,
        Int8Config,
        LowRankConfig,
    )

    use = set(TECHNIQUES[:4]) if technique == "all" else {technique}
    return ExtractionConfig(
        heads=HeadSelectionConfig(threshold if "heads" in use else 1.0),
        low_rank=LowRankConfig() if "low_rank" in use else None,
        int8=Int8Config() if "int8" in use else None,
        caching=BlockCachingConfig(min_ssim=fidelity) if "caching" in use else None,
    )


@contextlib.contextmanager
def _peer(pipe: Any, name: str) -> Iterator[Any]:
    """The base pipeline with a peer method switched on, switched off afterwards."""
    if name.startswith("deepcache"):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=int(name.split("_")[1]), cache_branch_id=0)
        helper.enable()
        try:
            yield pipe
        finally:
            helper.disable()
    else:
        import tomesd

        tomesd.apply_patch(pipe, ratio=float(name.split("_")[1]))
        try:
            yield pipe
        finally:
            tomesd.remove_patch(pipe)


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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every method on one model; returns ``{"model", ..., "rows": [...]}``."""
    from fragjobs.base_models import load_base
    from fragjobs.extraction import extract_fragment, weight_bytes
    from fragjobs.generation import GenerationConfig, generate_images, with_unet
    from fragjobs.profiling import ProfileConfig, profile_prompt
    from fragjobs.validation import compute_quality

    with tempfile.TemporaryDirectory() as data_dir:
        loaded = load_base(model, settings=Settings(data_dir=Path(data_dir)))
    pipe, info = loaded.pipe, loaded.info
    height = width = size or info.height
    steps = steps or info.default_steps
    gen = GenerationConfig(
        steps=steps,
        guidance_scale=info.default_guidance,
        height=height,
        width=width,
        batch_size=batch_size,
    )
    eval_seeds = list(range(100, 100 + batch_size))
    started = time.perf_counter()
    prof = profile_prompt(
        pipe,
        prompt,
        ProfileConfig(
            seeds=(0, 1),
            steps=steps,
            step_stride=1,
            guidance_scale=info.default_guidance,
            height=height,
            width=width,
        ),
        progress=False,
    )
    profile_s = time.perf_counter() - started
    full_images = generate_images(pipe, prompt, eval_seeds, gen)
    full_bytes = weight_bytes(pipe.unet)
    rows = []

    def measure(name: str, run_pipe: Any, unet_bytes: int, extra: dict[str, Any]) -> None:
        latency, peak = _measure(run_pipe, prompt, gen, repeats)
        images = generate_images(run_pipe, prompt, eval_seeds, gen)
        quality = compute_quality(full_images, images, prompt)
        rows.append(
            {
                "method": name,
                "latency_ms": round(latency, 2),
                "ssim": round(quality.ssim, 4),
                "psnr_db": round(quality.psnr_db, 2),
                "unet_bytes": unet_bytes,
                "bytes_ratio": round(unet_bytes / full_bytes, 3),
                "cuda_peak_mib": peak,
                **extra,
            }
        )
        log(json.dumps({"model": model, **rows[-1]}))

    measure("full", pipe, full_bytes, {})
    for name in methods:
        if name in TECHNIQUES:
            t0 = time.perf_counter()
            fragment, unet = extract_fragment(
                pipe,
                info,
                prof,
                _extraction_config(name, threshold, fidelity),
                profile_id="bench",
            )
            m = fragment.manifest
            extra = {
                "extract_s": round(time.perf_counter() - t0, 2),
                "heads_kept": f"{m.pruning.heads_kept}/{m.pruning.heads_total}",
                "caching": m.dynamic_routing.model_dump(
                    include={"enabled", "delta", "estimated_cost"}
                ),
            }
            measure(name, with_unet(pipe, unet), weight_bytes(unet), extra)
            del fragment, unet
        else:
            try:
                with _peer(pipe, name) as peer_pipe:
                    measure(name, peer_pipe, full_bytes, {})
            except ImportError as exc:
                rows.append(
                    {"method": name, "unavailable": f"{exc} (pip install deepcache tomesd)"}
                )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    full_ms = rows[0]["latency_ms"]
    for row in rows:
        if "latency_ms" in row:
            row["speedup"] = round(full_ms / row["latency_ms"], 3)
        if "extract_s" in row:
            saved_s = (full_ms - row["latency_ms"]) / 1000
            overhead = profile_s + row["extract_s"]
            row["break_even_variants"] = round(overhead / saved_s, 1) if saved_s > 0 else None
    return {
        "model": model,
        "size": height,
        "steps": steps,
        "batch_size": batch_size,
        "repeats": repeats,
        "profile_s": round(profile_s, 2),
        "rows": rows,
    }


def _measure(pipe: Any, prompt: str, gen: Any, repeats: int) -> tuple[float, float | None]:
    """Warm median per-image latency, and CUDA max allocated (MiB) on a GPU, else None."""
    from fragjobs.generation import measure_latency_ms

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    latency = measure_latency_ms(pipe, prompt, gen, repeats=repeats)
    peak = (
        round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
    )
    return latency, peak


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One markdown table for all models."""
    cols = [
        "method",
        "latency_ms",
        "speedup",
        "ssim",
        "psnr_db",
        "bytes_ratio",
        "cuda_peak_mib",
        "break_even_variants",
    ]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for result in results:
        label = f"{result['model']} {result['size']}px {result['steps']} steps"
        for row in result["rows"]:
            cells = [
                str(row.get(c, row.get("unavailable", "")) if c == "latency_ms" else row.get(c, ""))
                for c in cols
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Speed-up vs SSIM, one marker per method, one panel per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), 4))
    for i, result in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        for row in result["rows"]:
            if "speedup" in row:
                ax.scatter(row["ssim"], row["speedup"])
                ax.annotate(row["method"], (row["ssim"], row["speedup"]), fontsize=8)
        ax.set_xlabel("SSIM vs full model")
        ax.set_ylabel("speed-up vs full model")
        ax.set_title(f"{result['model']} {result['size']}px, {result['steps']} steps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fragjobs.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default="tiny-sd,sd15-shape")
    parser.add_argument("--methods", default=",".join(TECHNIQUES + PEERS))
    parser.add_argument("--threshold", type=float, default=0.75, help="fraction of heads kept")
    parser.add_argument("--fidelity", type=float, default=0.9, help="caching: min SSIM")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--size", type=int, default=None, help="image side (not for tiny-sd and shapes)"
    )
    parser.add_argument("--batch-size", type=int, default=1)
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
                methods=tuple(m.strip() for m in args.methods.split(",")),
                log=lambda line: print(line, flush=True),
            )
        )
        report = {"machine": machine, "threshold": args.threshold, "results": results}
        (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(results)
    (args.out / "bench.md").write_text(f"machine: {machine}\n\n{table}\n")
    plot(results, args.out / "bench.png")
    print(f"\nmachine: {machine}; median of {args.repeats}, warm\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
