"""The quality gate: thresholds from ``thresholds.yaml`` and the pass/fail decision.

A fragment is used for generation only if it passes its gate; otherwise generation falls back
to the full model. The thresholds live in one YAML file (packaged default:
``fragjobs/thresholds.yaml``; override with ``FRAGJOBS_THRESHOLDS_PATH``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fragjobs.config import get_settings
from fragjobs.errors import ConfigError
from fragjobs.keys import check_fraction
from fragjobs.validation.metrics import QualityMetrics


class Thresholds(BaseModel):
    """The thresholds of the quality gate and of hypotheses H1–H5.

    Fractions (``clip_delta_max``, ``lpips_max``, ``ssim_min``, ``vram_reduction_min``,
    ``reuse_pass_rate_min``) must be in (0, 1]; ``batch_speedup_min`` must be > 1;
    ``break_even_max_variants`` must be an integer >= 1. Every key is required and unknown
    keys are rejected, so a typo cannot silently fall back to a default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_delta_max: float
    lpips_max: float
    ssim_min: float
    vram_reduction_min: float
    batch_speedup_min: float
    reuse_pass_rate_min: float
    break_even_max_variants: int

    @field_validator(
        "clip_delta_max",
        "lpips_max",
        "ssim_min",
        "vram_reduction_min",
        "reuse_pass_rate_min",
        mode="before",
    )
    @classmethod
    def _fraction(cls, value: Any) -> float:
        return check_fraction(value, "this threshold")

    @field_validator("batch_speedup_min", mode="before")
    @classmethod
    def _speedup(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 1.0:
            raise ValueError(f"must be a number > 1 (a speed-up ratio), got {value!r}")
        return float(value)

    @field_validator("break_even_max_variants", mode="before")
    @classmethod
    def _variants(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"must be an integer >= 1 (a number of variants), got {value!r}")
        return value


def load_thresholds(path: Path | None = None) -> Thresholds:
    """Read and validate a thresholds YAML file.

    Args:
        path: the file; ``None`` → ``Settings.thresholds_path`` (``FRAGJOBS_THRESHOLDS_PATH``)
            if set, else the packaged ``fragjobs/thresholds.yaml``.

    Returns:
        The validated thresholds.

    Raises:
        ConfigError: the file is missing, is not a YAML mapping, lacks a key, has an unknown
            key or a value out of range; the message names the file and the key.
    """
    if path is None:
        path = get_settings().thresholds_path
    source = files("fragjobs").joinpath("thresholds.yaml") if path is None else Path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read thresholds file {source}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"thresholds file {source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"thresholds file {source} must be a mapping of threshold: value")
    try:
        return Thresholds.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"invalid thresholds file {source}: {problems}") from exc


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<file>"
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r} (allowed: {', '.join(Thresholds.model_fields)})"
    if error["type"] == "missing":
        return f"missing key {key!r}"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}"


class Check(BaseModel):
    """One comparison of the gate: ``value op limit``.

    ``status`` is ``UNAVAILABLE`` when the metric could not be computed (``value`` is ``None``
    and ``reason`` is the metric's reason); ``reason`` also explains a ``FAIL``.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    value: float | None
    limit: float
    op: Literal[">=", "<="]
    status: Literal["PASS", "FAIL", "UNAVAILABLE"]
    reason: str | None


class GateResult(BaseModel):
    """The gate's decision and every check behind it."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    checks: list[Check]


def evaluate_gate(metrics: QualityMetrics, thresholds: Thresholds) -> GateResult:
    """Gate a fragment on its quality metrics.

    Checks ``ssim >= ssim_min``, ``lpips <= lpips_max`` and ``clip_delta <= clip_delta_max``.
    A metric that could not be computed gives an ``UNAVAILABLE`` check carrying the metric's
    reason; it neither passes nor fails.

    Rule: ``passed`` is True only when the SSIM check (always computable) passes and no
    available check fails. So a fragment with LPIPS and CLIP unavailable passes on SSIM alone,
    and the report's hypothesis H1 says ``UNAVAILABLE`` rather than ``PASS``.

    Args:
        metrics: the fragment's metrics from :func:`compute_quality`.
        thresholds: the thresholds (see :func:`load_thresholds`).

    Returns:
        The decision and the three checks, SSIM first.
    """
    checks = [
        _check("ssim", metrics.ssim, thresholds.ssim_min, ">=", None),
        _check("lpips", metrics.lpips, thresholds.lpips_max, "<=", metrics.lpips_reason),
        _check(
            "clip_delta", metrics.clip_delta, thresholds.clip_delta_max, "<=", metrics.clip_reason
        ),
    ]
    passed = checks[0].status == "PASS" and all(c.status != "FAIL" for c in checks)
    return GateResult(passed=passed, checks=checks)


def _check(
    name: str,
    value: float | None,
    limit: float,
    op: Literal[">=", "<="],
    unavailable_reason: str | None,
) -> Check:
    if value is None:
        return Check(
            name=name,
            value=None,
            limit=limit,
            op=op,
            status="UNAVAILABLE",
            reason=unavailable_reason,
        )
    ok = value >= limit if op == ">=" else value <= limit
    reason = None if ok else f"{name} {value:.4g} is not {op} {limit:g}"
    return Check(
        name=name, value=value, limit=limit, op=op, status="PASS" if ok else "FAIL", reason=reason
    )
