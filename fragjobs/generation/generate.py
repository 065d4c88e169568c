"""Batched seed variants and warm latency measurement.

Every image is made from its own ``torch.Generator`` seeded with its seed, so a seed gives the
same image whatever batch it falls in (up to float rounding of batched kernels).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fragjobs.errors import InvalidInputError
from fragjobs.families import family_of
from fragjobs.keys import check_int, check_seeds, normalise_prompt


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings shared by full model and fragment (same steps, same guidance)."""

    steps: int
    guidance_scale: float
    height: int
    width: int
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_int(self.steps, "steps", minimum=1, maximum=1000)
        check_int(self.batch_size, "batch_size", minimum=1, maximum=1024)
        check_int(self.height, "height", minimum=8, maximum=4096)
        check_int(self.width, "width", minimum=8, maximum=4096)


def with_unet(pipe: Any, unet: torch.nn.Module) -> Any:
    """A pipeline of the same class sharing every component but its denoiser, ``unet`` (the
    family's: :func:`fragjobs.families.denoiser`, a UNet or a transformer).

    A shallow copy, so whatever the pipeline's class keeps besides its components comes
    along unchanged (SDXL's ``force_zeros_for_empty_prompt`` and watermarker, the base's
    identity); only the copy's denoiser is replaced.
    """
    new = copy.copy(pipe)
    setattr(new, family_of(pipe).denoiser, unet)
    new.set_progress_bar_config(disable=True)
    return new


@torch.no_grad()
def generate_images(
    pipe: Any,
    prompt: str,
    seeds: list[int],
    config: GenerationConfig,
    *,
    progress: bool = False,
    desc: str = "generate",
) -> torch.Tensor:
    """Generate one image per seed, ``config.batch_size`` at a time.

    Returns:
        Float tensor (N, 3, H, W) in [0, 1], in the order of ``seeds``.
    """
    normalise_prompt(prompt)
    seeds = check_seeds(seeds)
    batches = _pipeline_batches(pipe, prompt, seeds, config, "pt", progress, desc)
    return torch.cat([images.float().cpu().clamp(0, 1) for images in batches])


@torch.no_grad()
def generate_latents(
    pipe: Any,
    prompt: str,
    seeds: list[int],
    config: GenerationConfig,
    *,
    progress: bool = False,
    desc: str = "generate",
) -> torch.Tensor:
    """The final latents of one image per seed (before decoding), as :func:`generate_images`
    makes them: ``config.batch_size`` at a time, each seed from its own generator."""
    normalise_prompt(prompt)
    seeds = check_seeds(seeds)
    batches = _pipeline_batches(pipe, prompt, seeds, config, "latent", progress, desc)
    return torch.cat([latents.detach().float().cpu() for latents in batches])


def _pipeline_batches(
    pipe: Any,
    prompt: str,
    seeds: list[int],
    config: GenerationConfig,
    output_type: str,
    progress: bool,
    desc: str,
) -> Iterator[torch.Tensor]:
    """The pipeline's output for ``seeds``, one batch of ``config.batch_size`` at a time."""
    with tqdm(total=len(seeds), desc=desc, disable=not progress, unit="img") as bar:
        for start in range(0, len(seeds), config.batch_size):
            batch = seeds[start : start + config.batch_size]
            yield pipeline_call(pipe, prompt, batch, config, output_type)
            bar.update(len(batch))


def pipeline_call(
    pipe: Any,
    prompt: str,
    batch: Sequence[int],
    config: GenerationConfig,
    output_type: str,
    **extra,
) -> Any:
    """One pipeline call for the seeds of ``batch`` (each from its own generator); ``extra``
    goes to the pipeline (``latents``, ``callback_on_step_end``). Returns its ``images``."""
    return pipe(
        prompt,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        height=config.height,
        width=config.width,
        num_images_per_prompt=len(batch),
        generator=[torch.Generator("cpu").manual_seed(s) for s in batch],
        output_type=output_type,
        **family_of(pipe).call_kwargs,
        **extra,
    ).images


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Final latents → float images (N, 3, H, W) in [0, 1], as the pipeline decodes them."""
    vae = pipe.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(
        decoded, output_type="pt", do_denormalize=[True] * decoded.shape[0]
    )
    return images.float().cpu().clamp(0, 1)


def interleaved_latency_ms(
    pipes: list[Any], prompt: str, config: GenerationConfig, *, repeats: int = 5, seed: int = 0
) -> list[list[float]]:
    """Per-image latency (ms) of ``repeats`` warm batches of each of ``pipes``, timed in
    interleaved rounds: after one untimed warm-up batch of each, every round times one batch
    of each pipe in turn, the order rotating each round, so that a shared machine's drift
    hits every pipe alike (a ratio of two blocks timed one after the other takes the drift
    between them). One list of samples per pipe, in ``pipes``' order.

    Raises:
        InvalidInputError: no pipe, or ``repeats`` below 1.
    """
    if not pipes:
        raise InvalidInputError("interleaved latency needs at least one pipeline")
    check_int(repeats, "repeats", minimum=1)
    seeds = list(range(seed, seed + config.batch_size))
    for pipe in pipes:
        generate_images(pipe, prompt, seeds, config)
    timings: list[list[float]] = [[] for _ in pipes]
    for round_ in range(repeats):
        for offset in range(len(pipes)):
            index = (round_ + offset) % len(pipes)
            timings[index].append(batch_latency_ms(pipes[index], prompt, seeds, config))
    return timings


def batch_latency_ms(pipe: Any, prompt: str, seeds: list[int], config: GenerationConfig) -> float:
    """Per-image latency (ms) of one batch of ``seeds``, CUDA synchronised around it."""
    sync_device()
    started = time.perf_counter()
    generate_images(pipe, prompt, seeds, config)
    sync_device()
    return (time.perf_counter() - started) * 1000 / len(seeds)


def sync_device() -> None:
    """Wait for queued CUDA work (a no-op without a GPU), so a timer reads finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
