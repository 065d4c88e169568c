"""Validation of a fragment against its full model: quality metrics and the threshold gate."""

from fragjobs.validation.gate import (
    Check,
    GateResult,
    Thresholds,
    evaluate_gate,
    load_thresholds,
)
from fragjobs.validation.metrics import (
    PSNR_CAP_DB,
    QualityMetrics,
    check_image_batches,
    compute_quality,
    to_uint8,
)

__all__ = [
    "PSNR_CAP_DB",
    "Check",
    "GateResult",
    "QualityMetrics",
    "Thresholds",
    "check_image_batches",
    "compute_quality",
    "evaluate_gate",
    "load_thresholds",
    "to_uint8",
]
