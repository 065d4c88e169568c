"""Turn a profile into a fragment: head pruning, low-rank factorisation, int8 storage."""

from fragjobs.extraction.caching import (
    BlockCachingConfig,
    CachingSchedule,
    apply_block_caching,
    plan_block_caching,
    remove_block_caching,
    reset_block_caching,
)
from fragjobs.extraction.fragment import (
    ExtractionConfig,
    Fragment,
    apply_fragment_to_unet_,
    caching_schedule,
    extract_fragment,
    fragment_key,
    load_fragment_folder,
    read_fragment,
    save_fragment,
    seal,
    weight_bytes,
)
from fragjobs.extraction.heads import (
    HeadPruningConfig,
    HeadSelectionConfig,
    apply_head_pruning_,
    remove_head_pruning,
    select_heads,
)
from fragjobs.extraction.int8 import Int8Config, Int8Conv2d, Int8Linear, apply_int8_, plan_int8
from fragjobs.extraction.lowrank import LowRankConfig, LowRankLinear, apply_low_rank_, factorise

__all__ = [
    "BlockCachingConfig",
    "CachingSchedule",
    "apply_block_caching",
    "caching_schedule",
    "plan_block_caching",
    "remove_block_caching",
    "reset_block_caching",
    "ExtractionConfig",
    "Fragment",
    "HeadPruningConfig",
    "HeadSelectionConfig",
    "Int8Config",
    "Int8Conv2d",
    "Int8Linear",
    "LowRankConfig",
    "LowRankLinear",
    "apply_fragment_to_unet_",
    "apply_head_pruning_",
    "apply_int8_",
    "apply_low_rank_",
    "extract_fragment",
    "factorise",
    "fragment_key",
    "load_fragment_folder",
    "plan_int8",
    "read_fragment",
    "remove_head_pruning",
    "save_fragment",
    "seal",
    "select_heads",
    "weight_bytes",
]
