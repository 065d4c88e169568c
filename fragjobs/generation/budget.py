"""A memory budget per device, the cost of one image, and the batch size that fits.

The budget is what a job's generation may hold on its device, the model's weights included:
``FRAGJOBS_MEMORY_BUDGET_MB`` when set, else 80 % of the device's free memory read when the
job starts plus the weights the pipeline already holds there (free memory no longer counts
them). A batch of ``b`` images fits when ``weights on the device + b × per-sample cost`` is
within the budget.

The per-sample cost is estimated from the model's configuration before anything runs
(:func:`estimate_per_sample_bytes`) and measured on the first batch (:class:`PeakMemory`:
CUDA max allocated, MPS current allocated, else the process's RSS sampled while the batch
runs), divided by the batch size.

Example::

    budget = MemoryBudget.for_pipe(pipe, settings.memory_budget_mb)
    per_sample = estimate_per_sample_bytes(pipe, config)
    batch = choose_batch_size(budget, device_weight_bytes(pipe, budget.device), per_sample, 4)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from fragjobs.errors import ConfigError
from fragjobs.families import SD, PipelineFamily, denoiser, family_of
from fragjobs.generation.generate import GenerationConfig
from fragjobs.generation.memory import process_rss_bytes, weight_bytes

BUDGET_VARIABLE = "FRAGJOBS_MEMORY_BUDGET_MB"
FREE_MEMORY_FRACTION = 0.8
MIB = 2**20

# A rough multiplier of the estimate (the first batch's measurement replaces it): tensors alive
# at once in the VAE decoder (the denoiser's are its family's, fragjobs.families).
_VAE_WORKING_COPIES = 4


def check_budget_mb(value: Any) -> float | None:
    """``value`` if it is None (automatic) or a finite number of MiB > 0.

    Raises:
        ConfigError: anything else, naming ``FRAGJOBS_MEMORY_BUDGET_MB``.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{BUDGET_VARIABLE} must be a positive number of MiB, got {value!r} "
            "(unset it for 80% of the device's free memory)"
        )
    return float(value)


def free_device_bytes(device: torch.device) -> int:
    """Free memory of ``device`` now: CUDA ``mem_get_info``, MPS recommended minus driver
    allocated, CPU available memory (psutil)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return int(psutil.virtual_memory().available)


def device_weight_bytes(pipe: Any, device: torch.device) -> int:
    """Bytes of the pipeline's weights held on ``device``'s kind of device."""
    return sum(
        weight_bytes(module)
        for module in pipe.components.values()
        if isinstance(module, torch.nn.Module) and _module_device_type(module) == device.type
    )


def largest_component_bytes(pipe: Any) -> int:
    """Weights of the pipeline's largest model: what model CPU offload keeps on the device."""
    sizes = [weight_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return max(sizes, default=0)


def _module_device_type(module: torch.nn.Module) -> str | None:
    tensor = next(module.parameters(), None)
    return tensor.device.type if tensor is not None else None


@dataclass(frozen=True)
class MemoryBudget:
    """What a job's generation may hold on ``device``, in bytes, and where that came from."""

    device: torch.device
    budget_bytes: int
    source: str
    free_bytes: int | None = None

    @classmethod
    def for_pipe(cls, pipe: Any, budget_mb: float | None) -> MemoryBudget:
        """The budget on the pipeline's device: ``budget_mb`` MiB, or (None) 80 % of the
        device's free memory plus the weights the pipeline already holds there.

        Raises:
            ConfigError: ``budget_mb`` is not a positive number.
        """
        budget_mb = check_budget_mb(budget_mb)
        device = torch.device(pipe.device)
        if budget_mb is not None:
            return cls(device, int(budget_mb * MIB), BUDGET_VARIABLE)
        free = free_device_bytes(device)
        held = device_weight_bytes(pipe, device)
        return cls(
            device,
            int(free * FREE_MEMORY_FRACTION) + held,
            f"free memory x {FREE_MEMORY_FRACTION} + weights held",
            free,
        )

    def as_metrics(self) -> dict[str, Any]:
        """The budget's figures under the job metrics' names."""
        return {
            "device": str(self.device),
            "budget_bytes": self.budget_bytes,
            "budget_source": self.source,
            "free_bytes": self.free_bytes,
        }


def choose_batch_size(
    budget: MemoryBudget, resident_bytes: int, per_sample_bytes: int, ceiling: int
) -> int:
    """The largest batch (at most ``ceiling``) whose estimated need fits the budget.

    Returns:
        ``1..ceiling``, or 0 when even one image does not fit.
    """
    room = budget.budget_bytes - resident_bytes
    if room < per_sample_bytes:
        return 0
    return min(ceiling, room // max(1, per_sample_bytes))


def estimate_per_sample_bytes(
    pipe: Any, config: GenerationConfig, *, sliced: bool = False, tiled: bool = False
) -> int:
    """Estimated peak memory one image adds to a batch of ``pipe`` (see
    :func:`estimate_from_configs`), in the UNet's dtype."""
    tile = getattr(pipe.vae, "tile_sample_min_size", None) if tiled else None
    module = denoiser(pipe)
    return estimate_from_configs(
        module.config,
        pipe.vae.config,
        family=family_of(pipe),
        element_bytes=module.dtype.itemsize,
        height=config.height,
        width=config.width,
        guidance_scale=config.guidance_scale,
        sliced=sliced,
        tiled=tiled,
        tile=tile,
    )


def estimate_from_configs(
    unet: Mapping[str, Any],
    vae: Mapping[str, Any],
    *,
    element_bytes: int,
    height: int,
    width: int,
    guidance_scale: float,
    sliced: bool = False,
    tiled: bool = False,
    tile: int | None = None,
    family: PipelineFamily | None = None,
) -> int:
    """Estimated peak memory one image adds to a batch, from the denoiser's and VAE's configs.

    The denoiser's activations as its ``family`` estimates them (default SD's UNet: skip
    connections of every level plus working tensors at the widest one, and its largest
    self-attention score matrix, halved by attention slicing; twice with classifier-free
    guidance), the VAE decoder's full-resolution activations
    (reduced to one ``tile`` — default the VAE's sample size — by tiling) and the output
    image. A rough figure, made to be replaced by the measurement on the first batch; the
    doctor's capacity line uses it too, before any model is loaded.
    """
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    latent_h, latent_w = height // scale, width // scale
    unet_bytes = (family or SD).sample_bytes(
        unet,
        latent_h,
        latent_w,
        element_bytes=element_bytes,
        guidance=2 if guidance_scale > 1 else 1,
        sliced=sliced,
    )

    vae_pixels = height * width
    if tiled:
        tile = tile or vae["sample_size"]
        vae_pixels = min(vae_pixels, tile * tile)
    vae_bytes = element_bytes * (
        vae_pixels * vae["block_out_channels"][0] * _VAE_WORKING_COPIES + (latent_h * latent_w) ** 2
    )
    image_bytes = 3 * height * width * 4
    return int(unet_bytes + vae_bytes + image_bytes)


class PeakMemory:
    """Peak memory added on ``device`` while the ``with`` block runs (``added_bytes``).

    CUDA: max allocated (its peak statistics are reset on entry). MPS: current allocated
    after the block. CPU: the process's RSS, sampled every ``interval_s`` by a thread (the
    kernel's high-water mark would keep any earlier, larger peak of the process).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.added_bytes = 0
        self._before = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "mps":
            self._before = torch.mps.current_allocated_memory()
        else:
            self._before = self._peak = process_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, process_rss_bytes())

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "mps":
            peak = torch.mps.current_allocated_memory()
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            peak = max(self._peak, process_rss_bytes())
        self.added_bytes = max(0, peak - self._before)
