"""Memory one benchmark method holds, measured in a process of its own.

``python -m fragjobs.bench.memory --model M [--fragment DIR | --peer NAME]`` loads the base
pipeline, replays the fragment saved in ``DIR`` on its UNet in place (or switches a peer on),
generates one batch and prints one JSON object:

* ``rss_held_bytes``: resident set size after that batch minus the RSS before the model was
  loaded (Python, torch and diffusers already imported): what the pipeline with this method
  holds — weights, the other components, allocator caches;
* ``rss_peak_bytes``: the process's peak RSS (``ru_maxrss``) minus the same baseline. A
  fragment is replayed on the base UNet, so this peak includes the base weights it starts
  from; ``rss_held_bytes`` is what stays;
* ``unet_bytes``: parameter and buffer bytes of the UNet it generated with;
* ``cuda_max_allocated_bytes``: on a GPU, CUDA max allocated over load and batch, else null.

:func:`measure` runs it in a subprocess, so that each method's figures are its own and not
those of a process holding every other method as well.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fragjobs.bench.loading import load_for_bench, peer_pipeline
from fragjobs.errors import FragjobsError

PROBE_TIMEOUT_S = 1800


def measure(
    model: str,
    *,
    prompt: str,
    steps: int,
    size: int | None,
    batch_size: int,
    fragment_dir: Path | None = None,
    peer: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[str, Any]:
    """Run the probe in a fresh Python process; its JSON result.

    Raises:
        FragjobsError: the probe failed (its stderr's last lines are in the message).
    """
    cmd = [sys.executable, "-m", "fragjobs.bench.memory", "--model", model, "--prompt", prompt]
    cmd += ["--steps", str(steps), "--batch-size", str(batch_size)]
    if size is not None:
        cmd += ["--size", str(size)]
    if fragment_dir is not None:
        cmd += ["--fragment", str(fragment_dir)]
    if peer is not None:
        cmd += ["--peer", peer]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise FragjobsError(f"memory probe for {model} failed (rc {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe(
    model: str,
    *,
    prompt: str,
    steps: int,
    size: int | None,
    batch_size: int,
    fragment_dir: Path | None = None,
    peer: str | None = None,
) -> dict[str, Any]:
    """Load, apply, generate one batch in this process; the memory figures (see module)."""
    import diffusers
    import torch
    import transformers

    from fragjobs.extraction import apply_fragment_to_unet_, load_fragment_folder, weight_bytes
    from fragjobs.generation import generate_images
    from fragjobs.generation.memory import peak_rss_bytes, process_rss_bytes

    # diffusers and transformers import lazily: load the classes a pipeline uses first, so that
    # the baseline holds the libraries' code and the figures only the model.
    _ = diffusers.StableDiffusionPipeline, diffusers.UNet2DConditionModel
    _ = diffusers.AutoencoderKL, transformers.CLIPTextModel, transformers.CLIPTokenizer
    gc.collect()
    baseline = process_rss_bytes()
    loaded, gen = load_for_bench(model, size=size, steps=steps, batch_size=batch_size)
    pipe = loaded.pipe
    if fragment_dir is not None:
        apply_fragment_to_unet_(pipe.unet, load_fragment_folder(fragment_dir), loaded.info)
        gc.collect()
    switched = peer_pipeline(pipe, peer) if peer is not None else contextlib.nullcontext(pipe)
    with switched as run_pipe:
        generate_images(run_pipe, prompt, list(range(batch_size)), gen)
    gc.collect()
    return {
        "model": model,
        "fragment": None if fragment_dir is None else str(fragment_dir),
        "peer": peer,
        "rss_held_bytes": process_rss_bytes() - baseline,
        "rss_peak_bytes": peak_rss_bytes() - baseline,
        "unet_bytes": weight_bytes(pipe.unet),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fragjobs.bench.memory", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--fragment", type=Path, default=None, help="a saved fragment folder")
    method.add_argument("--peer", default=None, help="deepcache_3, deepcache_5, tome_0.5, ...")
    args = parser.parse_args(argv)
    result = probe(
        args.model,
        prompt=args.prompt,
        steps=args.steps,
        size=args.size,
        batch_size=args.batch_size,
        fragment_dir=args.fragment,
        peer=args.peer,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
