"""Seed variants in batches, timing and memory figures."""

from fragjobs.generation.generate import (
    GenerationConfig,
    decode_latents,
    generate_images,
    latency_samples_ms,
    measure_latency_ms,
    sync_device,
    with_unet,
)
from fragjobs.generation.memory import memory_report, peak_rss_bytes, process_rss_bytes

__all__ = [
    "GenerationConfig",
    "decode_latents",
    "generate_images",
    "latency_samples_ms",
    "measure_latency_ms",
    "memory_report",
    "peak_rss_bytes",
    "process_rss_bytes",
    "sync_device",
    "with_unet",
]
