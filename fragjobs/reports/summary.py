"""``metrics_summary.json``: one run's measurements and the verdict on hypotheses H1–H5.

Every number in the summary was measured in this run or computed from such numbers; a value
that was not measured is ``null`` and its hypothesis says ``UNAVAILABLE`` with a reason, never
``PASS`` (DESIGN §7). Floats are rounded to 6 significant digits; NaN and infinity are refused,
so the result always passes ``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from fragjobs.errors import InvalidInputError
from fragjobs.validation.break_even import break_even_delivered, break_even_old
from fragjobs.validation.gate import GateResult, Thresholds

if TYPE_CHECKING:
    from fragjobs.validation.metrics import QualityMetrics

SCHEMA = "fragjobs.metrics_summary/1"

H1_WARN_MARGIN = 0.25
"""H1 is WARN (not FAIL) when one of LPIPS / CLIP delta misses its limit by less than this
fraction of the limit."""

REUSE_NOT_MEASURED = "paraphrase reuse not measured in this run"
NEVER_PAYS_BACK = "fragment is not faster than the full model: never pays back"
GATE_FAILED = (
    "the fragment failed its quality gate, so it is not used: no speed-up is claimed at a "
    "fidelity the gate rejects"
)

Status = Literal["PASS", "WARN", "FAIL", "UNAVAILABLE"]


class Hypothesis(BaseModel):
    """One hypothesis of the summary: what it claims, the values behind it and its verdict."""

    model_config = ConfigDict(frozen=True)

    name: str
    claim: str
    values: dict[str, Any]
    thresholds: dict[str, float | int]
    status: Status
    reason: str | None = None


def build_metrics_summary(
    *,
    quality: QualityMetrics,
    gate: GateResult,
    thresholds: Thresholds,
    performance: dict,
    memory: dict,
    reuse: dict | None,
    model: str,
    prompt: str,
    device: str,
) -> dict:
    """Build the JSON-ready ``metrics_summary.json`` of one run.

    Args:
        quality: the fragment's quality metrics.
        gate: the gate's decision on them.
        thresholds: the thresholds used by the gate and the hypotheses.
        performance: ``latency_full_ms``, ``latency_fragment_ms`` (per image, same steps, same
            batch, warm, measured in this run), ``batch_size``, ``steps``, ``overhead_s``
            (profile + extract + validate seconds of this run), ``chain_s`` (the seconds the
            chain spent before the fragment generates variants; default ``overhead_s``) and
            ``delivered_full_model_images`` (how many of the full-model images that work made
            were delivered as variants; default 0); any may be missing or ``None``. H5 is
            decided on break-even as :func:`~fragjobs.validation.break_even.break_even_delivered`
            counts it, the seed's definition beside it (``break_even_variants_old``).
        memory: ``full_bytes``, ``fragment_bytes`` (weight bytes of each model) and ``kind``
            (how they were counted); ``peak_full_bytes``, ``peak_fragment_bytes`` (measured
            peak of one batch, each model in a fresh process: H2 is decided on these),
            ``peak_kind`` (how, e.g. ``"cuda_max_allocated"``, ``"cpu_peak_rss"``) and
            ``peak_reason`` (why they are missing, when they are).
        reuse: ``pass_rate`` (fraction of paraphrases on which the fragment passed its gate, or
            ``None``) and ``n`` (paraphrases tried); ``None`` when not measured.
        model: the base model's name.
        prompt: the prompt.
        device: the machine/device the run was measured on.

    Returns:
        ``{"schema", "model", "prompt", "device", "hypotheses": {"H1".."H5"}, "quality",
        "gate", "performance", "memory", "reuse"}``; each hypothesis is ``{"name", "claim",
        "values", "thresholds", "status", "reason"}`` with status PASS / WARN / FAIL /
        UNAVAILABLE. ``"performance"``, ``"memory"`` and ``"reuse"`` are the inputs (``{}``
        for ``reuse=None``), rounded.

    Raises:
        InvalidInputError: a measurement is not a finite number, or is out of range (negative
            bytes or latencies, a pass rate outside [0, 1]).
    """
    reuse = dict(reuse) if reuse is not None else {}
    hypotheses = {
        "H1": _h1_quality(quality, thresholds),
        "H2": _h2_memory(memory, thresholds),
        "H3": _h3_reuse(reuse, thresholds),
        "H4": _h4_speed(performance, thresholds, gate.passed),
        "H5": _h5_break_even(performance, thresholds, gate.passed),
    }
    summary = {
        "schema": SCHEMA,
        "model": model,
        "prompt": prompt,
        "device": device,
        "hypotheses": {key: h.model_dump() for key, h in hypotheses.items()},
        "quality": quality.model_dump(),
        "gate": gate.model_dump(),
        "performance": dict(performance),
        "memory": dict(memory),
        "reuse": reuse,
    }
    return _rounded(summary, "summary")


def _h1_quality(quality: QualityMetrics, thresholds: Thresholds) -> Hypothesis:
    limits = {
        "ssim_min": thresholds.ssim_min,
        "colour_delta_e_max": thresholds.colour_delta_e_max,
        "lpips_max": thresholds.lpips_max,
        "clip_delta_max": thresholds.clip_delta_max,
    }
    ssim_worst = min(quality.ssim_per_image)
    colour_worst = _worst(quality.colour_delta_e_per_image, quality.colour_delta_e)
    lpips_worst = _worst(quality.lpips_per_image, quality.lpips)
    clip_worst = _worst(quality.clip_delta_per_image, quality.clip_delta)
    hypothesis = {
        "name": "quality preserved",
        "claim": "On every validation seed the fragment's images match the full model's "
        "(the worst seed decides): SSIM >= ssim_min, colour ΔE00 <= colour_delta_e_max, "
        "LPIPS <= lpips_max, CLIP-score drop <= clip_delta_max.",
        "values": {
            "ssim": quality.ssim,
            "ssim_worst": ssim_worst,
            "colour_delta_e": quality.colour_delta_e,
            "colour_delta_e_worst": colour_worst,
            "psnr_db": quality.psnr_db,
            "lpips": quality.lpips,
            "lpips_worst": lpips_worst,
            "clip_delta": quality.clip_delta,
            "clip_delta_worst": clip_worst,
        },
        "thresholds": limits,
    }
    missing = [
        f"{name} is null ({reason})"
        for name, value, reason in (
            ("colour_delta_e", colour_worst, "not measured in this run"),
            ("lpips", quality.lpips, quality.lpips_reason),
            ("clip_delta", quality.clip_delta, quality.clip_reason),
        )
        if value is None
    ]
    if missing:
        return Hypothesis(**hypothesis, status="UNAVAILABLE", reason="; ".join(missing))
    failures = []
    if ssim_worst < thresholds.ssim_min:
        failures.append(f"worst seed's ssim {ssim_worst:.4g} < ssim_min {thresholds.ssim_min:g}")
    if colour_worst > thresholds.colour_delta_e_max:
        failures.append(
            f"worst seed's colour ΔE00 {colour_worst:.4g} > colour_delta_e_max "
            f"{thresholds.colour_delta_e_max:g}"
        )
    if failures:
        return Hypothesis(**hypothesis, status="FAIL", reason="; ".join(failures))
    misses = [
        (name, value - limit, limit)
        for name, value, limit in (
            ("lpips", lpips_worst, thresholds.lpips_max),
            ("clip_delta", clip_worst, thresholds.clip_delta_max),
        )
        if value > limit
    ]
    if not misses:
        return Hypothesis(**hypothesis, status="PASS")
    reason = "; ".join(
        f"worst seed's {name} exceeds its limit {limit:g} by {excess:.4g}"
        for name, excess, limit in misses
    )
    near = len(misses) == 1 and misses[0][1] < H1_WARN_MARGIN * misses[0][2]
    return Hypothesis(**hypothesis, status="WARN" if near else "FAIL", reason=reason)


def _worst(per_image: list[float] | None, mean: float | None) -> float | None:
    """The largest per-image value; the mean when only the mean was recorded."""
    return max(per_image) if per_image else mean


def _h2_memory(memory: Mapping[str, Any], thresholds: Thresholds) -> Hypothesis:
    full = _measurement(memory, "full_bytes", "memory", positive=True)
    fragment = _measurement(memory, "fragment_bytes", "memory")
    peak_full = _measurement(memory, "peak_full_bytes", "memory", positive=True)
    peak_fragment = _measurement(memory, "peak_fragment_bytes", "memory")
    minimum = thresholds.vram_reduction_min
    peak_reduction = (
        None if peak_full is None or peak_fragment is None else 1.0 - peak_fragment / peak_full
    )
    hypothesis = {
        "name": "memory reduced",
        "claim": "Measured peak memory of one batch, each model in a fresh process (CUDA max "
        "allocated on a GPU, peak RSS on a CPU), is at least vram_reduction_min lower for the "
        "fragment: peak_reduction = 1 - peak_fragment_bytes / peak_full_bytes. Weight bytes "
        "(reduction) are reported, not decided on.",
        "values": {
            "kind": memory.get("kind"),
            "full_bytes": full,
            "fragment_bytes": fragment,
            "reduction": None if full is None or fragment is None else 1.0 - fragment / full,
            "peak_kind": memory.get("peak_kind"),
            "peak_full_bytes": peak_full,
            "peak_fragment_bytes": peak_fragment,
            "peak_reduction": peak_reduction,
        },
        "thresholds": {"vram_reduction_min": minimum},
    }
    if peak_reduction is None:
        reason = memory.get("peak_reason") or (
            "peak memory was not measured in this run (weight bytes alone do not decide H2)"
        )
        return Hypothesis(**hypothesis, status="UNAVAILABLE", reason=str(reason))
    return _graded(
        hypothesis,
        peak_reduction >= minimum,
        peak_reduction > 0,
        f"peak_reduction {peak_reduction:.4g}",
    )


def _h3_reuse(reuse: Mapping[str, Any], thresholds: Thresholds) -> Hypothesis:
    pass_rate = _measurement(reuse, "pass_rate", "reuse")
    minimum = thresholds.reuse_pass_rate_min
    hypothesis = {
        "name": "prompt reuse",
        "claim": "A fragment built for one prompt passes its gate on paraphrases of that prompt "
        "at a rate >= reuse_pass_rate_min.",
        "values": {"pass_rate": pass_rate, "n": reuse.get("n")},
        "thresholds": {"reuse_pass_rate_min": minimum},
    }
    if pass_rate is None:
        return Hypothesis(**hypothesis, status="UNAVAILABLE", reason=REUSE_NOT_MEASURED)
    if pass_rate > 1.0:
        raise InvalidInputError(f"reuse.pass_rate must be in [0, 1], got {pass_rate}")
    return _graded(
        hypothesis,
        pass_rate >= minimum,
        pass_rate >= 0.5 * minimum,
        f"pass rate {pass_rate:.4g}",
    )


def _latencies(performance: Mapping[str, Any]) -> tuple[float | None, float | None]:
    return (
        _measurement(performance, "latency_full_ms", "performance", positive=True),
        _measurement(performance, "latency_fragment_ms", "performance", positive=True),
    )


def _h4_speed(
    performance: Mapping[str, Any], thresholds: Thresholds, gate_passed: bool
) -> Hypothesis:
    full, fragment = _latencies(performance)
    minimum = thresholds.batch_speedup_min
    speedup = None if full is None or fragment is None else full / fragment
    hypothesis = {
        "name": "batch speed-up",
        "claim": "Per-image latency, same steps, same batch, warm, measured in this run (the "
        "median of each model's batches, timed in interleaved rounds), of a fragment that "
        "passed its quality gate: full / fragment >= batch_speedup_min.",
        "values": {
            "latency_full_ms": full,
            "latency_fragment_ms": fragment,
            "speedup": speedup,
            "batch_size": performance.get("batch_size"),
            "steps": performance.get("steps"),
        },
        "thresholds": {"batch_speedup_min": minimum},
    }
    if speedup is None:
        reason = "latency_full_ms and latency_fragment_ms were not both measured in this run"
        return Hypothesis(**hypothesis, status="UNAVAILABLE", reason=reason)
    if not gate_passed:
        return Hypothesis(
            **hypothesis, status="FAIL", reason=f"speed-up {speedup:.4g}: {GATE_FAILED}"
        )
    return _graded(hypothesis, speedup >= minimum, speedup > 1.0, f"speed-up {speedup:.4g}")


def _h5_break_even(
    performance: Mapping[str, Any], thresholds: Thresholds, gate_passed: bool
) -> Hypothesis:
    full, fragment = _latencies(performance)
    overhead = _measurement(performance, "overhead_s", "performance")
    chain = _measurement(performance, "chain_s", "performance")
    chain = overhead if chain is None else chain
    delivered = performance.get("delivered_full_model_images", 0)
    if isinstance(delivered, bool) or not isinstance(delivered, int) or delivered < 0:
        raise InvalidInputError(
            f"performance.delivered_full_model_images must be an integer >= 0, got {delivered!r}"
        )
    maximum = thresholds.break_even_max_variants
    saving = None if full is None or fragment is None else (full - fragment) / 1000.0
    hypothesis = {
        "name": "break-even",
        "claim": "The seconds the chain spent (profile + extract + validate) beyond delivering "
        "its full-model images as variants (each credited at the full model's per-image "
        "time) are paid back by the per-image saving within break_even_max_variants images. "
        "break_even_variants_old: the seed's definition, all of profile + extract + validate "
        "÷ saving. The latency measurement is a measurement for the report, counted in "
        "neither.",
        "values": {
            "overhead_s": overhead,
            "chain_s": chain,
            "delivered_full_model_images": delivered,
            "saving_per_image_s": saving,
            "break_even_variants": None,
            "break_even_variants_old": None,
        },
        "thresholds": {"break_even_max_variants": maximum},
    }
    if saving is None or overhead is None:
        reason = "overhead_s and both latencies were not all measured in this run"
        return Hypothesis(**hypothesis, status="UNAVAILABLE", reason=reason)
    if saving <= 0:
        return Hypothesis(**hypothesis, status="FAIL", reason=NEVER_PAYS_BACK)
    if not gate_passed:
        return Hypothesis(**hypothesis, status="FAIL", reason=GATE_FAILED)
    full_s, fragment_s = full / 1000.0, fragment / 1000.0
    variants = break_even_delivered(chain, delivered, full_s, fragment_s)
    hypothesis["values"]["break_even_variants"] = variants
    hypothesis["values"]["break_even_variants_old"] = break_even_old(overhead, full_s, fragment_s)
    return _graded(
        hypothesis, variants <= maximum, variants <= 2 * maximum, f"break-even {variants:.4g}"
    )


def _graded(hypothesis: dict[str, Any], passes: bool, warns: bool, what: str) -> Hypothesis:
    """PASS if ``passes``, else WARN if ``warns``, else FAIL; the reason names the value."""
    if passes:
        return Hypothesis(**hypothesis, status="PASS")
    limits = ", ".join(f"{k} {v:g}" for k, v in hypothesis["thresholds"].items())
    return Hypothesis(
        **hypothesis, status="WARN" if warns else "FAIL", reason=f"{what} misses {limits}"
    )


def _measurement(
    section: Mapping[str, Any], key: str, where: str, *, positive: bool = False
) -> float | None:
    """``section[key]`` (an int stays an int) or ``None``; refuse non-numbers, NaN, negatives."""
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{where}.{key} must be a finite number or null, got {value!r}")
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise InvalidInputError(f"{where}.{key} must be {bound}, got {value}")
    return value


def _rounded(value: Any, where: str) -> Any:
    """A copy of ``value`` with floats rounded to 6 significant digits; refuse NaN/inf."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{where} is {value}: measurements must be finite or null")
        return float(f"{value:.6g}")
    if isinstance(value, Mapping):
        return {str(k): _rounded(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
