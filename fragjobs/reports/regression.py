"""The regression gate: one run against a baseline, by the ``regression:`` rules of
``thresholds.yaml`` (the seed's ``evaluate_regression``).

Each rule names a metric of :data:`~fragjobs.validation.gate.REGRESSION_METRICS`, whose
direction of "worse" is known, and a ``max_delta`` (absolute, or ``relative`` to the
baseline's value). A metric that got worse by more than its ``max_delta`` is a regression; a
metric that one of the two runs could not compute is a check that could not run (recorded
with the reason), and a FAIL only when ``required_metrics`` names it. A fragment that passed
its quality gate in the baseline and fails it now is always a regression.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fragjobs.errors import InvalidInputError
from fragjobs.reports.folders import DIFF_FILE, Report
from fragjobs.validation.gate import REGRESSION_METRICS, Thresholds

SCHEMA = "fragjobs.regression_diff/1"

EXIT_OK, EXIT_REGRESSION, EXIT_INVALID = 0, 1, 2

NOISY_SPREAD = 1.5
"""A timing metric is not compared when, in either run, the slowest of the timed repeats of
the full model or the fragment took more than this times the fastest: load on a shared
machine made that ratio up (DESIGN §7), so the check is recorded as one that could not run."""


def timing_spread(summary: dict[str, Any]) -> float | None:
    """Max / min of the timed repeats, the wider of full model and fragment (None: unknown)."""
    performance = summary.get("performance") or {}
    spreads = []
    for key in ("latency_full_ms_range", "latency_fragment_ms_range"):
        span = performance.get(key)
        if not (
            isinstance(span, list)
            and len(span) == 2
            and all(isinstance(v, int | float) and v > 0 for v in span)
        ):
            return None
        spreads.append(span[1] / span[0])
    return max(spreads)


def metric_values(summary: dict[str, Any]) -> dict[str, tuple[float | None, str | None]]:
    """Every regression metric of a summary: ``name -> (value, reason when None)``."""
    quality = summary.get("quality") or {}
    hyp = summary.get("hypotheses") or {}

    def value(section: dict[str, Any], key: str, reason: str | None) -> tuple[Any, Any]:
        got = section.get(key)
        ok = isinstance(got, int | float) and not isinstance(got, bool) and math.isfinite(got)
        return (float(got), None) if ok else (None, reason or f"{key} was not measured")

    def hyp_values(name: str) -> dict[str, Any]:
        return (hyp.get(name) or {}).get("values") or {}

    def hyp_reason(name: str) -> str | None:
        return (hyp.get(name) or {}).get("reason")

    per_image = quality.get("ssim_per_image") or []
    worst = min(per_image) if per_image else None
    colour = quality.get("colour_delta_e_per_image") or []
    colour_worst = max(colour) if colour else None
    colour_reason = "colour ΔE was not measured (a run from before fragjobs measured it)"
    return {
        "ssim": value(quality, "ssim", None),
        "ssim_worst": value({"ssim_worst": worst}, "ssim_worst", None),
        "colour_delta_e": value(quality, "colour_delta_e", colour_reason),
        "colour_delta_e_worst": value(
            {"colour_delta_e_worst": colour_worst}, "colour_delta_e_worst", colour_reason
        ),
        "psnr_db": value(quality, "psnr_db", None),
        "lpips": value(quality, "lpips", quality.get("lpips_reason")),
        "clip_delta": value(quality, "clip_delta", quality.get("clip_reason")),
        "speedup": value(hyp_values("H4"), "speedup", hyp_reason("H4")),
        "break_even_variants": value(hyp_values("H5"), "break_even_variants", hyp_reason("H5")),
        "memory_reduction": value(hyp_values("H2"), "peak_reduction", hyp_reason("H2")),
        "reuse_pass_rate": value(hyp_values("H3"), "pass_rate", hyp_reason("H3")),
    }


def check_comparable(current: Report, baseline: Report) -> None:
    """Refuse a pair that cannot be compared.

    Raises:
        InvalidInputError: either run is INVALID, or the two are of another base model or
            another prompt.
    """
    for role, report in (("run", current), ("baseline", baseline)):
        if not report.valid:
            raise InvalidInputError(
                f"{role} {report.run_id} is INVALID: {'; '.join(report.problems)}"
            )
    if current.base_model_hash != baseline.base_model_hash:
        raise InvalidInputError(
            f"baseline {baseline.run_id} is of another base model ({baseline.model}, "
            f"{str(baseline.base_model_hash)[:12]}…) than run {current.run_id} "
            f"({current.model}, {str(current.base_model_hash)[:12]}…)"
        )
    if current.prompt != baseline.prompt:
        raise InvalidInputError(
            f"baseline {baseline.run_id} is of another prompt ({baseline.prompt!r}) than run "
            f"{current.run_id} ({current.prompt!r})"
        )


def evaluate_regression(
    current: Report,
    baseline: Report | None,
    thresholds: Thresholds,
    *,
    baseline_reason: str | None = None,
    thresholds_source: str | None = None,
) -> dict[str, Any]:
    """The ``regression_diff.json`` document of ``current`` against ``baseline``.

    Args:
        current: the run; baseline: the run it is compared with, or None (``baseline_reason``
            says why there is none: the document then says ``NO_BASELINE``).
        thresholds: the ``regression:`` rules and ``required_metrics``.
        thresholds_source: where the thresholds came from (recorded).

    Returns:
        ``{"schema", "run_id", "baseline", "status" (PASS / REGRESSION / NO_BASELINE),
        "passed", "regressions", "not_run", "checks"}``; each check is ``{"metric", "kind",
        "better", "current", "baseline", "worse_by", "max_delta", "relative", "status",
        "reason"}``.

    Raises:
        InvalidInputError: the pair cannot be compared (see :func:`check_comparable`), or the
            thresholds have no ``regression:`` rules.
    """
    if not thresholds.regression:
        raise InvalidInputError(
            f"thresholds {thresholds_source or ''} have no regression: rules "
            "(add e.g. `regression: {ssim: {max_delta: 0.02}}`)".replace("  ", " ")
        )
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": current.run_id,
        "model": current.model,
        "prompt": current.prompt,
        "thresholds": thresholds_source,
        "baseline": None,
        "baseline_reason": baseline_reason,
        "rules": {k: v.model_dump() for k, v in thresholds.regression.items()},
        "required_metrics": list(thresholds.required_metrics),
    }
    if baseline is None:
        return {
            **document,
            "status": "NO_BASELINE",
            "passed": None,
            "regressions": [],
            "not_run": [],
            "checks": [],
        }
    check_comparable(current, baseline)
    now, then = metric_values(current.summary), metric_values(baseline.summary)
    checks = [_gate_check(current, baseline)]
    for name, rule in thresholds.regression.items():
        metric = REGRESSION_METRICS[name]
        (value, reason), (base, base_reason) = now[name], then[name]
        check: dict[str, Any] = {
            "metric": name,
            "kind": metric.kind,
            "better": metric.better,
            "current": value,
            "baseline": base,
            "worse_by": None,
            "max_delta": rule.max_delta,
            "relative": rule.relative,
        }
        if metric.kind == "timing" and value is not None and base is not None:
            noisy = _noisy_timings(current, baseline)
            if noisy:
                checks.append({**check, "status": "UNAVAILABLE", "reason": noisy})
                continue
        if value is None or base is None:
            why = f"current run: {reason}" if value is None else f"baseline: {base_reason}"
            required = name in thresholds.required_metrics and value is None
            checks.append(
                {
                    **check,
                    "status": "FAIL" if required else "UNAVAILABLE",
                    "reason": (f"{name} is required (required_metrics); " if required else "")
                    + why,
                }
            )
            continue
        worse_by = (base - value) if metric.better == "higher" else (value - base)
        allowed = rule.max_delta * abs(base) if rule.relative else rule.max_delta
        check["worse_by"] = _round(worse_by)
        if worse_by > allowed + 1e-12:
            limit = f"{rule.max_delta:g}" + (" of the baseline" if rule.relative else "")
            checks.append(
                {
                    **check,
                    "status": "FAIL",
                    "reason": f"{name} {_fmt(value)} vs baseline {_fmt(base)}: worse by "
                    f"{_fmt(worse_by)}, more than max_delta {limit}",
                }
            )
        else:
            checks.append({**check, "status": "PASS", "reason": None})
    regressions = [c["metric"] for c in checks if c["status"] == "FAIL"]
    return {
        **document,
        "baseline": {"run_id": baseline.run_id, "path": str(baseline.path)},
        "status": "REGRESSION" if regressions else "PASS",
        "passed": not regressions,
        "regressions": regressions,
        "not_run": [
            f"{c['metric']}: {c['reason']}" for c in checks if c["status"] == "UNAVAILABLE"
        ],
        "checks": checks,
    }


def write_diff(folder: Path, document: dict[str, Any]) -> Path:
    """Write ``regression_diff.json`` into ``folder``."""
    path = folder / DIFF_FILE
    path.write_text(json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def exit_status(document: dict[str, Any]) -> int:
    """0: no regression; 1: a regression (a FAIL check). NO_BASELINE is not a pass: 2."""
    if document["status"] == "NO_BASELINE":
        return EXIT_INVALID
    return EXIT_OK if document["passed"] else EXIT_REGRESSION


def _noisy_timings(current: Report, baseline: Report) -> str | None:
    """Why the two runs' timings cannot be compared (:data:`NOISY_SPREAD`), or None."""
    noisy = []
    for role, report in (("current run", current), ("baseline", baseline)):
        spread = timing_spread(report.summary)
        if spread is None:
            noisy.append(f"{role}: repeats not recorded")
        elif spread > NOISY_SPREAD:
            noisy.append(f"{role} x{spread:.2f}")
    if not noisy:
        return None
    return (
        f"timings too noisy to compare: slowest / fastest timed repeat {', '.join(noisy)} "
        f"(more than x{NOISY_SPREAD:g})"
    )


def _gate_check(current: Report, baseline: Report) -> dict[str, Any]:
    now, then = current.gate_passed, baseline.gate_passed
    failed = bool(then) and not now
    return {
        "metric": "gate_passed",
        "kind": "quality",
        "better": "higher",
        "current": now,
        "baseline": then,
        "worse_by": None,
        "max_delta": None,
        "relative": False,
        "status": "FAIL" if failed else "PASS",
        "reason": "the fragment passed its quality gate in the baseline and fails it now"
        if failed
        else None,
    }


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _fmt(value: float) -> str:
    return f"{value:.4g}"
