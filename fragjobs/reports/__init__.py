"""Reports of a run: the metrics summary (H1–H5), report folders, the regression gate, plots
and HTML pages.

* :mod:`~fragjobs.reports.summary` — ``metrics_summary.json`` (H1–H5);
* :mod:`~fragjobs.reports.seed_names` — the seed project's field names beside ours;
* :mod:`~fragjobs.reports.folders` — ``reports/YYYY-MM-DD_HHMM[-n]/``: naming, reading back,
  validity (an INVALID run never becomes a baseline), ``latest`` / ``best`` / baselines;
* :mod:`~fragjobs.reports.profiling_raw` — ``profiling_raw.parquet``;
* :mod:`~fragjobs.reports.regression` — ``regression_diff.json`` and its exit status;
* :mod:`~fragjobs.reports.plots` — latency, quality trade-off and trend plots;
* :mod:`~fragjobs.reports.html` — the run's ``index.html`` and the index over all runs;
* :mod:`~fragjobs.reports.builder` — writes one run's folder from what the run measured;
* :mod:`~fragjobs.reports.compare` — the side-by-side comparison image.

Names are imported from their modules on first use, so that reading reports (``fragjobs
report ls|show|--compare``) does not load torch.
"""

from __future__ import annotations

from fragjobs.lazy_exports import lazy_getattr

_EXPORTS = {
    "SCHEMA": "fragjobs.reports.summary",
    "Hypothesis": "fragjobs.reports.summary",
    "build_metrics_summary": "fragjobs.reports.summary",
    "add_seed_names": "fragjobs.reports.seed_names",
    "save_compare_image": "fragjobs.reports.compare",
    "tensor_to_pil": "fragjobs.reports.compare",
    "Report": "fragjobs.reports.folders",
    "default_reports_root": "fragjobs.reports.folders",
    "find_baseline": "fragjobs.reports.folders",
    "list_reports": "fragjobs.reports.folders",
    "read_report": "fragjobs.reports.folders",
    "resolve_report": "fragjobs.reports.folders",
    "evaluate_regression": "fragjobs.reports.regression",
    "RunData": "fragjobs.reports.builder",
    "write_run_report": "fragjobs.reports.builder",
    "write_index_page": "fragjobs.reports.html",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
