"""Memory a model holds while it makes one batch, measured in a process of its own.

``python -m fragjobs.generation.memory_probe --model M [--fragment DIR]`` loads the base
pipeline (with ``DIR``: the base's other components and the fragment's UNet, built without the
base UNet's weights, :func:`fragjobs.extraction.lean_load.load_fragment_pipeline`), generates
one batch and prints one JSON object:

* ``rss_held_bytes``: resident set size after that batch minus the RSS before the model was
  loaded (Python, torch and diffusers already imported): what the pipeline holds — weights,
  the other components, allocator caches;
* ``rss_held_trimmed_bytes``: the same after glibc's ``malloc_trim`` gave the freed heap
  pages back: what live objects hold, without the allocator's cache of freed memory — what a
  node holds between jobs, since the chain's generate step trims after every job
  (:func:`fragjobs.generation.memory.release_freed_heap`);
* ``rss_peak_bytes``: the process's peak RSS (``VmHWM``) minus the same baseline: loading,
  building the fragment's UNet and the batch;
* ``unet_bytes``: parameter and buffer bytes of the denoiser (UNet or transformer) it
  generated with;
* ``int8_execution``: how a fragment's int8 layers computed
  (:func:`fragjobs.extraction.int8_exec.set_int8_execution_`; ``float``: dequantised once at
  load, so they hold float weights), null without int8 layers;
* ``cuda_max_allocated_bytes``: on a GPU, CUDA max allocated over load and batch, else null;
* ``cuda_batch_max_allocated_bytes``: on a GPU, CUDA max allocated during the batch alone
  (peak statistics reset once the model is loaded and the fragment applied), else null.

:func:`measure` runs it in a subprocess, so that each model's figures are its own and not
those of a process holding the other model too. :func:`peak_figure` is the one figure
hypothesis H2 is decided on. ``fragjobs.bench.memory`` is this probe with peer methods
(DeepCache, ToMe) added.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fragjobs.config import Settings
from fragjobs.errors import FragjobsError

PROBE_TIMEOUT_S = 1800
PROBE_MODULE = "fragjobs.generation.memory_probe"

PipelineWrapper = Callable[[Any], contextlib.AbstractContextManager]
"""Given the loaded pipeline, a context manager yielding the pipeline to generate with."""


def load_for_probe(
    model: str,
    *,
    size: int | None,
    steps: int | None,
    batch_size: int,
    data_dir: Path | None = None,
    device: str | None = None,
    fragment_dir: Path | None = None,
) -> tuple[Any, Any]:
    """The model and the generation settings of a probe (and of the benchmarks).

    Square images of ``size`` (default: the model's own), ``steps`` (default: the model's),
    the model's guidance scale. ``data_dir``: the data folder whose base-hash cache is used
    (default: a throwaway one). ``fragment_dir``: a saved fragment, loaded on the base with
    :func:`fragjobs.extraction.lean_load.load_fragment_pipeline` (hashes and base checked).
    """
    from fragjobs.base_models import load_base
    from fragjobs.generation.generate import GenerationConfig

    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        settings = Settings(data_dir=data_dir)
        if fragment_dir is None:
            loaded = load_base(model, device=device, settings=settings)
        else:
            from fragjobs.extraction.fragment import load_fragment_folder
            from fragjobs.extraction.lean_load import load_fragment_pipeline

            fragment = load_fragment_folder(fragment_dir)
            loaded = load_fragment_pipeline(
                model,
                fragment,
                device=device,
                settings=settings,
                int8_execution=settings.int8_execution,
            )
            del fragment
    info = loaded.info
    side = size or info.height
    gen = GenerationConfig(
        steps=steps or info.default_steps,
        guidance_scale=info.default_guidance,
        height=side,
        width=side,
        batch_size=batch_size,
    )
    return loaded, gen


def probe(
    model: str,
    *,
    prompt: str,
    steps: int | None,
    size: int | None,
    batch_size: int,
    fragment_dir: Path | None = None,
    wrap: PipelineWrapper | None = None,
    data_dir: Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Load, apply, generate one batch in this process; the memory figures (see module)."""
    import diffusers
    import torch
    import transformers

    from fragjobs.extraction.int8_exec import int8_execution
    from fragjobs.families import denoiser
    from fragjobs.generation.generate import generate_images
    from fragjobs.generation.memory import (
        peak_rss_bytes,
        process_rss_bytes,
        release_freed_heap,
        weight_bytes,
    )

    # diffusers and transformers import lazily: load the classes a pipeline uses first, so that
    # the baseline holds the libraries' code and the figures only the model.
    _ = diffusers.StableDiffusionPipeline, diffusers.UNet2DConditionModel
    _ = diffusers.AutoencoderKL, transformers.CLIPTextModel, transformers.CLIPTokenizer
    gc.collect()
    baseline = process_rss_bytes()
    loaded, gen = load_for_probe(
        model,
        size=size,
        steps=steps,
        batch_size=batch_size,
        data_dir=data_dir,
        device=device,
        fragment_dir=fragment_dir,
    )
    pipe = loaded.pipe
    gc.collect()
    cuda = torch.cuda.is_available() and pipe.device.type == "cuda"
    whole_process = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with (wrap or contextlib.nullcontext)(pipe) as run_pipe:
        generate_images(run_pipe, prompt, list(range(batch_size)), gen)
    batch_peak = torch.cuda.max_memory_allocated() if cuda else None
    gc.collect()
    held_rss = process_rss_bytes()
    # The kernel updates VmHWM from RSS counters it syncs lazily (per thread, every so many
    # page faults), so it can trail the RSS just read by a few hundred KiB.
    peak = max(peak_rss_bytes(), held_rss)
    release_freed_heap()
    return {
        "model": model,
        "fragment": None if fragment_dir is None else str(fragment_dir),
        "device": str(pipe.device),
        "steps": gen.steps,
        "size": gen.height,
        "batch_size": batch_size,
        "rss_held_bytes": held_rss - baseline,
        "rss_held_trimmed_bytes": process_rss_bytes() - baseline,
        "rss_peak_bytes": peak - baseline,
        "unet_bytes": weight_bytes(denoiser(pipe)),
        "int8_execution": int8_execution(denoiser(pipe)),
        "cuda_max_allocated_bytes": None if not cuda else max(whole_process, batch_peak),
        "cuda_batch_max_allocated_bytes": batch_peak,
    }


def probe_command(
    model: str,
    *,
    prompt: str,
    steps: int | None,
    size: int | None,
    batch_size: int,
    fragment_dir: Path | None = None,
    data_dir: Path | None = None,
    device: str | None = None,
    module: str = PROBE_MODULE,
) -> list[str]:
    """The command line that runs ``module``'s probe with these arguments."""
    cmd = [sys.executable, "-m", module, "--model", model, "--prompt", prompt]
    cmd += ["--batch-size", str(batch_size)]
    for flag, value in (
        ("--steps", steps),
        ("--size", size),
        ("--fragment", fragment_dir),
        ("--data-dir", data_dir),
        ("--device", device),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def measure(
    model: str,
    *,
    prompt: str,
    steps: int | None,
    size: int | None,
    batch_size: int,
    fragment_dir: Path | None = None,
    data_dir: Path | None = None,
    device: str | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run the probe in a fresh Python process; its JSON result.

    ``command``: another probe's command line (:func:`probe_command` with ``module=``).

    Raises:
        FragjobsError: the probe failed or timed out (its stderr's last lines are in the
            message).
    """
    cmd = command or probe_command(
        model,
        prompt=prompt,
        steps=steps,
        size=size,
        batch_size=batch_size,
        fragment_dir=fragment_dir,
        data_dir=data_dir,
        device=device,
    )
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FragjobsError(f"memory probe for {model} timed out after {timeout_s:g} s") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise FragjobsError(f"memory probe for {model} failed (rc {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_figure(figures: dict[str, Any]) -> tuple[int, str]:
    """The probe's figure that H2 is decided on, and what it is.

    On a GPU: CUDA max allocated during the batch (the weights it holds plus what generating
    allocates). On a CPU: the peak RSS of the whole probe process (load, building the
    fragment's UNet, one batch) over its baseline: what a process that serves only this model
    needs at most.
    """
    if figures.get("cuda_batch_max_allocated_bytes") is not None:
        return int(figures["cuda_batch_max_allocated_bytes"]), "cuda_max_allocated_one_batch"
    return int(figures["rss_peak_bytes"]), "cpu_peak_rss_fresh_process"


def parser(prog: str = f"python -m {PROBE_MODULE}") -> argparse.ArgumentParser:
    """The probe's command-line arguments (a caller may add its own)."""
    out = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    out.add_argument("--model", required=True)
    out.add_argument("--prompt", required=True)
    out.add_argument("--steps", type=int, default=None)
    out.add_argument("--size", type=int, default=None)
    out.add_argument("--batch-size", type=int, default=1)
    out.add_argument("--fragment", type=Path, default=None, help="a saved fragment folder")
    out.add_argument("--data-dir", type=Path, default=None, help="data folder (hash cache)")
    out.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    return out


def run_from_args(args: argparse.Namespace, wrap: PipelineWrapper | None = None) -> int:
    """Probe with parsed arguments and print the JSON result on one line."""
    result = probe(
        args.model,
        prompt=args.prompt,
        steps=args.steps,
        size=args.size,
        batch_size=args.batch_size,
        fragment_dir=args.fragment,
        wrap=wrap,
        data_dir=args.data_dir,
        device=args.device,
    )
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
