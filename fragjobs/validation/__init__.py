"""Validation of a fragment against its full model: quality metrics and the threshold gate.

Names are imported from their modules on first use: reading ``thresholds.yaml`` (the gate)
does not load torch, which the metrics need.
"""

from __future__ import annotations

from fragjobs.lazy_exports import lazy_getattr

_EXPORTS = {
    "GATE_METRICS": "fragjobs.validation.gate",
    "REGRESSION_METRICS": "fragjobs.validation.gate",
    "Check": "fragjobs.validation.gate",
    "GateResult": "fragjobs.validation.gate",
    "RegressionMetric": "fragjobs.validation.gate",
    "RegressionRule": "fragjobs.validation.gate",
    "Thresholds": "fragjobs.validation.gate",
    "evaluate_gate": "fragjobs.validation.gate",
    "load_thresholds": "fragjobs.validation.gate",
    "PSNR_CAP_DB": "fragjobs.validation.metrics",
    "QualityMetrics": "fragjobs.validation.metrics",
    "check_image_batches": "fragjobs.validation.metrics",
    "compute_quality": "fragjobs.validation.metrics",
    "to_uint8": "fragjobs.validation.metrics",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
