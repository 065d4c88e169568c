"""Seed variants in batches within a memory budget, timing and memory figures."""

from fragjobs.generation.budget import (
    MemoryBudget,
    check_budget_mb,
    choose_batch_size,
    estimate_per_sample_bytes,
)
from fragjobs.generation.generate import (
    GenerationConfig,
    batch_latency_ms,
    decode_latents,
    generate_images,
    interleaved_latency_ms,
    sync_device,
    with_unet,
)
from fragjobs.generation.memory import memory_report, peak_rss_bytes, process_rss_bytes
from fragjobs.generation.oom_ladder import (
    BudgetedGeneration,
    generate_within_budget,
    is_out_of_memory,
)

__all__ = [
    "BudgetedGeneration",
    "GenerationConfig",
    "MemoryBudget",
    "batch_latency_ms",
    "check_budget_mb",
    "choose_batch_size",
    "decode_latents",
    "estimate_per_sample_bytes",
    "generate_images",
    "generate_within_budget",
    "is_out_of_memory",
    "interleaved_latency_ms",
    "memory_report",
    "peak_rss_bytes",
    "process_rss_bytes",
    "sync_device",
    "with_unet",
]
