"""Whether a step of the benchmark fits in the memory left, decided before it runs.

A large model can be timed where some of the benchmark's steps cannot run beside it: the
fragment extraction copies the denoiser (``sdxl-shape``'s UNet is 10.3 GB in float32, beside
12.7 GB of pipeline on a 24 GB machine), and a memory probe loads the whole pipeline again
in a process of its own. Such a step is skipped with the figures that decided it, instead of
being killed by the out-of-memory killer halfway through.
"""

from __future__ import annotations

from typing import Any

import psutil
import torch

MARGIN_BYTES = 1 << 30
"""Room kept free beyond a step's estimate: activations, allocator caches, the rest."""


def pipeline_bytes(pipe: Any) -> int:
    """Parameter and buffer bytes of every module component of the pipeline."""
    from fragjobs.generation.memory import weight_bytes

    return sum(
        weight_bytes(component)
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
    )


def available_bytes(device: torch.device) -> int:
    """Memory free for a new allocation: the GPU's free memory on CUDA, else the system's
    available memory (free plus reclaimable caches)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def shortfall(needed_bytes: int, device: torch.device, what: str) -> str | None:
    """``None`` when ``needed_bytes`` plus :data:`MARGIN_BYTES` fit in the memory available
    now on ``device``; else the reason, with both figures, for the row that skips ``what``."""
    free = available_bytes(device)
    if needed_bytes + MARGIN_BYTES <= free:
        return None
    where = "GPU" if device.type == "cuda" else "RAM"
    return (
        f"not run: {what} needs {needed_bytes / 2**30:.1f} GiB (+{MARGIN_BYTES / 2**30:.0f} GiB "
        f"margin), {free / 2**30:.1f} GiB of {where} available"
    )
