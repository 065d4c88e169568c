"""The quality gate: thresholds from ``thresholds.yaml`` and the pass/fail decision.

A fragment is used for generation only if it passes its gate; otherwise generation falls back
to the full model. The thresholds live in one YAML file (packaged default:
``fragjobs/thresholds.yaml``; override with ``FRAGJOBS_THRESHOLDS_PATH``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fragjobs.config import get_settings
from fragjobs.errors import ConfigError, InvalidInputError
from fragjobs.keys import check_fraction

if TYPE_CHECKING:  # the metrics need torch; reading thresholds does not
    from fragjobs.validation.metrics import QualityMetrics

GATE_METRICS = ("ssim", "colour_delta_e", "lpips", "clip_delta")
"""The metrics the quality gate checks, in the order of its checks."""

ALWAYS_COMPUTED = ("ssim", "colour_delta_e")
"""Gate metrics computed from the images alone (no weights, no model): the gate passes only
when each of them passes."""


@dataclass(frozen=True)
class RegressionMetric:
    """A figure two reports can be compared on, and which direction is worse.

    ``kind``: ``quality`` (deterministic for fixed seeds and code), ``timing`` (a ratio of two
    timings measured in one run on one machine: compare with a wide tolerance), ``memory``
    or ``reuse``.
    """

    name: str
    better: Literal["higher", "lower"]
    kind: Literal["quality", "timing", "memory", "reuse"]
    description: str


REGRESSION_METRICS = {
    m.name: m
    for m in (
        RegressionMetric("ssim", "higher", "quality", "mean SSIM vs the full model"),
        RegressionMetric("ssim_worst", "higher", "quality", "worst validation seed's SSIM"),
        RegressionMetric(
            "colour_delta_e", "lower", "quality", "mean colour ΔE00 vs the full model"
        ),
        RegressionMetric(
            "colour_delta_e_worst", "lower", "quality", "worst validation seed's colour ΔE00"
        ),
        RegressionMetric("psnr_db", "higher", "quality", "mean PSNR vs the full model (dB)"),
        RegressionMetric("lpips", "lower", "quality", "mean LPIPS vs the full model"),
        RegressionMetric("clip_delta", "lower", "quality", "CLIP-score drop vs the full model"),
        RegressionMetric("speedup", "higher", "timing", "per-image latency full / fragment"),
        RegressionMetric(
            "break_even_variants",
            "lower",
            "timing",
            "variants until the chain's seconds beyond its delivered full-model images pay back",
        ),
        RegressionMetric(
            "memory_reduction", "higher", "memory", "1 - measured peak fragment / full"
        ),
        RegressionMetric("reuse_pass_rate", "higher", "reuse", "paraphrases passing the gate"),
    )
}
"""Every metric a ``regression:`` rule of ``thresholds.yaml`` may name."""


class RegressionRule(BaseModel):
    """How much worse than its baseline a metric may get: ``max_delta`` in the metric's units,
    or, with ``relative: true``, as a fraction of the baseline's value."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_delta: float
    relative: bool = False

    @field_validator("max_delta", mode="before")
    @classmethod
    def _delta(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"must be a number >= 0, got {value!r}")
        return float(value)

    @field_validator("relative", mode="before")
    @classmethod
    def _relative(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value


class Thresholds(BaseModel):
    """The thresholds of the quality gate, of hypotheses H1–H5 and of the regression gate.

    Fractions (``clip_delta_max``, ``lpips_max``, ``ssim_min``, ``vram_reduction_min``,
    ``reuse_pass_rate_min``) must be in (0, 1]; ``colour_delta_e_max`` (CIEDE2000 units)
    must be a number > 0; ``batch_speedup_min`` must be > 1; ``break_even_max_variants`` must
    be an integer >= 1. Every one of these is required and unknown keys are rejected, so a
    typo cannot silently fall back to a default. The gate's limits (``ssim_min``,
    ``colour_delta_e_max``, ``lpips_max``, ``clip_delta_max``) hold for every validation
    seed: the worst seed decides.

    ``required_metrics`` (default ``[ssim]``): gate metrics (:data:`GATE_METRICS`) that must
    have been computed; a missing one fails the gate with that reason. ``regression``
    (default: none): per metric of :data:`REGRESSION_METRICS`, a :class:`RegressionRule` for
    ``fragjobs report --compare ... --gate``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_delta_max: float
    lpips_max: float
    ssim_min: float
    colour_delta_e_max: float
    vram_reduction_min: float
    batch_speedup_min: float
    reuse_pass_rate_min: float
    break_even_max_variants: int
    required_metrics: tuple[str, ...] = ("ssim",)
    regression: dict[str, RegressionRule] = {}

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

    @field_validator("colour_delta_e_max", mode="before")
    @classmethod
    def _delta_e(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"must be a number > 0 (a CIEDE2000 difference), got {value!r}")
        return float(value)

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

    @field_validator("required_metrics", mode="before")
    @classmethod
    def _required(cls, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of metric names, got {value!r}")
        unknown = sorted(set(value) - set(GATE_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(GATE_METRICS)}")
        return tuple(value)

    @field_validator("regression", mode="before")
    @classmethod
    def _regression(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping of metric: {{max_delta: ...}}, got {value!r}")
        unknown = sorted(set(value) - set(REGRESSION_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(REGRESSION_METRICS)}")
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
    """One comparison of the gate: ``value op limit``, ``value`` being the worst seed's.

    ``status`` is ``UNAVAILABLE`` when the metric could not be computed (``value`` is ``None``
    and ``reason`` is the metric's reason); ``reason`` also explains a ``FAIL``, naming the
    seed. ``seed``: the worst seed (``None`` when the seeds were not given, or only a mean
    was recorded); ``image``: its index in the batch; ``mean``: the mean over seeds, for
    reports (the gate does not decide on it).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    value: float | None
    limit: float
    op: Literal[">=", "<="]
    status: Literal["PASS", "FAIL", "UNAVAILABLE"]
    reason: str | None
    mean: float | None = None
    image: int | None = None
    seed: int | None = None


class GateResult(BaseModel):
    """The gate's decision and every check behind it.

    ``not_run``: one line per check the gate could not run (its metric was not computed),
    with the reason, e.g. ``"lpips: no LPIPS weights ..."``; empty when every check ran.
    """

    model_config = ConfigDict(frozen=True)

    passed: bool
    checks: list[Check]
    not_run: list[str] = []


_NOT_MEASURED = "not measured (metrics recorded before fragjobs measured it per seed)"


def evaluate_gate(
    metrics: QualityMetrics, thresholds: Thresholds, seeds: Sequence[int] | None = None
) -> GateResult:
    """Gate a fragment on its quality metrics, the worst seed deciding.

    Checks, on the worst image of the batch: ``ssim >= ssim_min``, ``colour_delta_e <=
    colour_delta_e_max``, ``lpips <= lpips_max`` and ``clip_delta <= clip_delta_max``. One
    bad seed among good ones fails the gate; the means are kept on each check for reports.
    A metric that could not be computed gives an ``UNAVAILABLE`` check carrying the metric's
    reason; it neither passes nor fails.

    Rule: ``passed`` is True only when the SSIM and colour checks (computed from the images
    alone) pass, no available check fails and every metric of
    ``thresholds.required_metrics`` was computed (a missing required metric is a ``FAIL``
    check saying so). A fragment with LPIPS and CLIP unavailable and not required passes on
    SSIM and colour; ``not_run`` then names both checks with their reasons, and the report's
    hypothesis H1 says ``UNAVAILABLE`` rather than ``PASS``.

    Args:
        metrics: the fragment's metrics from :func:`compute_quality`.
        thresholds: the thresholds (see :func:`load_thresholds`).
        seeds: the seeds of the images, in order, to name the worst one in each check.

    Returns:
        The decision and the four checks, in the order of :data:`GATE_METRICS`.

    Raises:
        InvalidInputError: ``seeds`` is not one seed per image.
    """
    if seeds is not None and len(seeds) != metrics.num_images:
        raise InvalidInputError(
            f"seeds name {len(seeds)} images but the metrics have {metrics.num_images}"
        )
    checks = [
        _check(
            "ssim", metrics.ssim, metrics.ssim_per_image, thresholds.ssim_min, ">=", None, seeds
        ),
        _check(
            "colour_delta_e",
            metrics.colour_delta_e,
            metrics.colour_delta_e_per_image,
            thresholds.colour_delta_e_max,
            "<=",
            _NOT_MEASURED,
            seeds,
        ),
        _check(
            "lpips",
            metrics.lpips,
            metrics.lpips_per_image,
            thresholds.lpips_max,
            "<=",
            metrics.lpips_reason,
            seeds,
        ),
        _check(
            "clip_delta",
            metrics.clip_delta,
            metrics.clip_delta_per_image,
            thresholds.clip_delta_max,
            "<=",
            metrics.clip_reason,
            seeds,
        ),
    ]
    checks = [_required(c) if c.name in thresholds.required_metrics else c for c in checks]
    passed = all(c.status == "PASS" for c in checks if c.name in ALWAYS_COMPUTED) and all(
        c.status != "FAIL" for c in checks
    )
    not_run = [f"{c.name}: {c.reason}" for c in checks if c.value is None]
    return GateResult(passed=passed, checks=checks, not_run=not_run)


def _required(check: Check) -> Check:
    """A check of a required metric: FAIL instead of UNAVAILABLE when it was not computed."""
    if check.status != "UNAVAILABLE":
        return check
    reason = f"{check.name} is required (required_metrics) but was not computed: {check.reason}"
    return check.model_copy(update={"status": "FAIL", "reason": reason})


def _check(
    name: str,
    mean: float | None,
    per_image: list[float] | None,
    limit: float,
    op: Literal[">=", "<="],
    unavailable_reason: str | None,
    seeds: Sequence[int] | None,
) -> Check:
    if mean is None:
        return Check(
            name=name,
            value=None,
            limit=limit,
            op=op,
            status="UNAVAILABLE",
            reason=unavailable_reason,
        )
    image = seed = None
    value = mean  # metrics recorded before per-image values: only the mean is known
    if per_image:
        pick = min if op == ">=" else max
        image = pick(range(len(per_image)), key=per_image.__getitem__)
        value = per_image[image]
        seed = None if seeds is None else seeds[image]
    ok = value >= limit if op == ">=" else value <= limit
    reason = None
    if not ok:
        where = (
            f"on seed {seed}"
            if seed is not None
            else f"on image {image}"
            if image is not None
            else "(mean)"
        )
        reason = f"{name} {value:.4g} {where} is not {op} {limit:g} (mean {mean:.4g})"
    return Check(
        name=name,
        value=value,
        limit=limit,
        op=op,
        status="PASS" if ok else "FAIL",
        reason=reason,
        mean=mean,
        image=image,
        seed=seed,
    )
