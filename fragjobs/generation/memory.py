"""Memory figures: weight bytes held, peak RSS (CPU) and CUDA max allocated (GPU)."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Any

import psutil
import torch


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (int8 weights count one byte each)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def process_rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own
    memory. Not ``ru_maxrss``, which a child inherits from the process that forked it (and
    keeps across ``exec``): a probe started by a large benchmark process would report the
    parent's peak. Elsewhere: ``ru_maxrss`` (kilobytes on Linux, bytes on macOS).
    """
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_report(full_unet: torch.nn.Module, fragment_unet: torch.nn.Module) -> dict[str, Any]:
    """Weight bytes of both UNets, plus peak memory of the process or the GPU."""
    report: dict[str, Any] = {
        "kind": "unet_weight_bytes",
        "full_bytes": weight_bytes(full_unet),
        "fragment_bytes": weight_bytes(fragment_unet),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if torch.cuda.is_available():
        report["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return report


def release_freed_heap() -> None:
    """Give freed heap pages back to the system (glibc's ``malloc_trim``).

    glibc serves tensors below its (growing) mmap threshold from the heap and keeps the pages
    they free resident: the streamed build of a built-in UNet (measured on sd15-shape: about
    600 MiB), and the float copies an int8 layer makes of its weight on every call (about
    400 MiB on sd15-shape's int8 fragment). Called after such a build and after every
    generation job, so what a node holds between jobs is what its models hold. Elsewhere
    (no glibc) nothing to do: that allocator decides when to return memory.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides when to return memory
