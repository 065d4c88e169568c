"""Reports of a run: the metrics summary (hypotheses H1–H5) and the comparison image."""

from fragjobs.reports.compare import save_compare_image, tensor_to_pil
from fragjobs.reports.summary import SCHEMA, Hypothesis, build_metrics_summary

__all__ = ["SCHEMA", "Hypothesis", "build_metrics_summary", "save_compare_image", "tensor_to_pil"]
