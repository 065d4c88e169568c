"""Per-head, per-block and per-layer statistics of a pipeline on one prompt."""

from fragjobs.families import denoiser_blocks
from fragjobs.profiling.processor import ProfilingAttnProcessor, RecordingState
from fragjobs.profiling.profile import (
    ProfileConfig,
    PromptProfile,
    attention_modules,
    profile_prompt,
)

__all__ = [
    "ProfileConfig",
    "ProfilingAttnProcessor",
    "PromptProfile",
    "RecordingState",
    "attention_modules",
    "denoiser_blocks",
    "profile_prompt",
]
