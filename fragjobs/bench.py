"""Benchmark: full model vs fragment, measured in one run (``python -m fragjobs.bench``).

For each model: profile + extract (in a throw-away workspace), then time full model and
fragment with the same prompt, steps, batch and seeds, warm, median of ``--repeats``; report
the per-image latency ratio, the UNet weight-bytes ratio and peak RSS. Prints a table and
writes JSON. Speed figures are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fragjobs.config import Settings


def bench_model(
    model: str,
    *,
    threshold: float,
    steps: int | None,
    size: int | None,
    batch_size: int,
    repeats: int,
    prompt: str,
    low_rank: bool,
    int8: bool,
) -> dict[str, Any]:
    """Measure one model; returns the row of the table."""
    from fragjobs.base_models import load_base
    from fragjobs.extraction import (
        ExtractionConfig,
        HeadSelectionConfig,
        Int8Config,
        LowRankConfig,
        extract_fragment,
        weight_bytes,
    )
    from fragjobs.generation import GenerationConfig, peak_rss_bytes, with_unet
    from fragjobs.profiling import ProfileConfig, profile_prompt

    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir))
        loaded = load_base(model, settings=settings)
        info = loaded.info
        height = width = size or info.height
        steps = steps or info.default_steps
        started = time.perf_counter()
        prof = profile_prompt(
            loaded.pipe,
            prompt,
            ProfileConfig(seeds=(0, 1), steps=steps, step_stride=1, height=height, width=width),
            progress=False,
        )
        config = ExtractionConfig(
            heads=HeadSelectionConfig(threshold),
            low_rank=LowRankConfig() if low_rank else None,
            int8=Int8Config() if int8 else None,
        )
        fragment, unet = extract_fragment(loaded.pipe, info, prof, config, profile_id="bench")
        overhead = time.perf_counter() - started
        gen = GenerationConfig(
            steps=steps, guidance_scale=7.5, height=height, width=width, batch_size=batch_size
        )
        full_ms, full_peak = _measure(loaded.pipe, prompt, gen, repeats)
        frag_ms, frag_peak = _measure(with_unet(loaded.pipe, unet), prompt, gen, repeats)
        full_bytes, frag_bytes = weight_bytes(loaded.pipe.unet), weight_bytes(unet)
        saved = full_ms - frag_ms
        m = fragment.manifest
        return {
            "model": model,
            "size": height,
            "steps": steps,
            "batch_size": batch_size,
            "heads_kept": f"{m.pruning.heads_kept}/{m.pruning.heads_total}",
            "latency_full_ms": round(full_ms, 2),
            "latency_fragment_ms": round(frag_ms, 2),
            "speedup": round(full_ms / frag_ms, 3),
            "unet_bytes_full": full_bytes,
            "unet_bytes_fragment": frag_bytes,
            "bytes_ratio": round(frag_bytes / full_bytes, 3),
            "overhead_s": round(overhead, 2),
            "break_even_variants": round(overhead / (saved / 1000), 1) if saved > 0 else None,
            "peak_rss_mib": round(peak_rss_bytes() / 2**20),
            "cuda_peak_full_mib": full_peak,
            "cuda_peak_fragment_mib": frag_peak,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fragjobs.bench", description=__doc__)
    parser.add_argument("--models", default="tiny-sd,sd15-shape")
    parser.add_argument("--threshold", type=float, default=0.75, help="fraction of heads kept")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--size", type=int, default=None, help="image side for models other than tiny-sd"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="a dog on a jet ski")
    parser.add_argument("--no-low-rank", action="store_true")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        rows.append(
            bench_model(
                model.strip(),
                threshold=args.threshold,
                steps=args.steps,
                size=None if model.strip() == "tiny-sd" else args.size,
                batch_size=args.batch_size,
                repeats=args.repeats,
                prompt=args.prompt,
                low_rank=not args.no_low_rank,
                int8=not args.no_int8,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    print(f"\nmachine: {machine}; threshold {args.threshold}; median of {args.repeats}, warm")
    cols = [
        "model",
        "size",
        "steps",
        "heads_kept",
        "latency_full_ms",
        "latency_fragment_ms",
        "speedup",
        "bytes_ratio",
        "break_even_variants",
        "peak_rss_mib",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
