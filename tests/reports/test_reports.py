"""Tests of fragjobs.reports: metrics_summary (H1–H5) and the comparison image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fragjobs.errors import InvalidInputError
from fragjobs.reports import SCHEMA, build_metrics_summary, save_compare_image, tensor_to_pil
from fragjobs.reports.summary import NEVER_PAYS_BACK, REUSE_NOT_MEASURED
from fragjobs.validation import QualityMetrics, Thresholds, evaluate_gate, load_thresholds

THRESHOLDS = load_thresholds(Path(__file__).parents[2] / "fragjobs" / "thresholds.yaml")

PERFORMANCE = {
    "latency_full_ms": 2000.0,
    "latency_fragment_ms": 1000.0,
    "batch_size": 4,
    "steps": 20,
    "overhead_s": 8.0,
}
MEMORY = {
    "full_bytes": 1000,
    "fragment_bytes": 500,
    "kind": "cpu_param_bytes",
    "peak_full_bytes": 4000,
    "peak_fragment_bytes": 2000,
}
REUSE = {"pass_rate": 0.9, "n": 10}


def quality(**changes: Any) -> QualityMetrics:
    values = {
        "ssim": 0.95,
        "ssim_per_image": [0.95],
        "psnr_db": 30.0,
        "psnr_per_image": [30.0],
        "lpips": 0.05,
        "lpips_reason": None,
        "clip_full": 0.31,
        "clip_fragment": 0.30,
        "clip_delta": 0.01,
        "clip_reason": None,
        "num_images": 1,
        "height": 32,
        "width": 32,
        "colour_delta_e": 1.0,
    }
    values.update(changes)
    for name in ("ssim", "lpips", "clip_delta", "colour_delta_e"):  # one image: worst = mean
        if f"{name}_per_image" not in changes:
            values[f"{name}_per_image"] = None if values[name] is None else [values[name]]
    return QualityMetrics(**values)


def summary(
    *,
    metrics: QualityMetrics | None = None,
    thresholds: Thresholds = THRESHOLDS,
    performance: dict | None = None,
    memory: dict | None = None,
    reuse: dict | None = REUSE,
) -> dict:
    metrics = metrics or quality()
    return build_metrics_summary(
        quality=metrics,
        gate=evaluate_gate(metrics, thresholds),
        thresholds=thresholds,
        performance=PERFORMANCE if performance is None else performance,
        memory=MEMORY if memory is None else memory,
        reuse=reuse,
        model="tiny-sd",
        prompt="a red cube",
        device="cpu (test)",
    )


def hypothesis(result: dict, key: str) -> tuple[str, str | None, dict]:
    h = result["hypotheses"][key]
    return h["status"], h["reason"], h["values"]


# --- summary structure ---------------------------------------------------------------------


def test_summary_skeleton_is_strict_json() -> None:
    result = summary()
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    assert result["schema"] == SCHEMA
    assert (result["model"], result["prompt"], result["device"]) == (
        "tiny-sd",
        "a red cube",
        "cpu (test)",
    )
    assert set(result) == {
        "schema",
        "model",
        "prompt",
        "device",
        "hypotheses",
        "quality",
        "gate",
        "performance",
        "memory",
        "reuse",
    }
    assert list(result["hypotheses"]) == ["H1", "H2", "H3", "H4", "H5"]
    for h in result["hypotheses"].values():
        assert set(h) == {"name", "claim", "values", "thresholds", "status", "reason"}
        assert h["status"] == "PASS"
        assert h["reason"] is None
    assert result["quality"]["ssim"] == 0.95
    assert result["gate"]["passed"] is True
    assert result["hypotheses"]["H1"]["thresholds"] == {
        "ssim_min": 0.85,
        "colour_delta_e_max": THRESHOLDS.colour_delta_e_max,
        "lpips_max": 0.15,
        "clip_delta_max": 0.03,
    }


def test_floats_are_rounded_to_six_significant_digits_and_nan_is_refused() -> None:
    result = summary(performance={**PERFORMANCE, "latency_full_ms": 2345.678912})
    assert result["performance"]["latency_full_ms"] == 2345.68
    assert result["hypotheses"]["H4"]["values"]["speedup"] == 2.34568
    with pytest.raises(InvalidInputError, match="latency_full_ms"):
        summary(performance={**PERFORMANCE, "latency_full_ms": float("nan")})
    with pytest.raises(InvalidInputError, match="performance.extra"):
        summary(performance={**PERFORMANCE, "extra": float("inf")})


# --- H1 quality ----------------------------------------------------------------------------


def test_h1_unavailable_when_clip_is_null_even_if_ssim_is_fine() -> None:
    metrics = quality(
        ssim=1.0, clip_full=None, clip_fragment=None, clip_delta=None, clip_reason="no CLIP model"
    )
    result = summary(metrics=metrics)
    status, reason, values = hypothesis(result, "H1")
    assert status == "UNAVAILABLE"
    assert "clip_delta" in reason and "no CLIP model" in reason
    assert values["clip_delta"] is None
    assert result["gate"]["passed"] is True
    json.dumps(result, allow_nan=False)


def test_h1_unavailable_names_lpips_when_lpips_is_null() -> None:
    status, reason, _ = hypothesis(
        summary(metrics=quality(lpips=None, lpips_reason="no weights")), "H1"
    )
    assert status == "UNAVAILABLE"
    assert "lpips" in reason and "clip_delta" not in reason


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, "PASS"),
        ({"lpips": 0.16}, "WARN"),  # misses 0.15 by 0.01 < 25 % of 0.15
        ({"clip_delta": 0.035}, "WARN"),  # misses 0.03 by 0.005 < 0.0075
        ({"lpips": 0.2}, "FAIL"),  # misses by 0.05 >= 0.0375
        ({"lpips": 0.16, "clip_delta": 0.035}, "FAIL"),  # two limits missed
        ({"ssim": 0.8}, "FAIL"),
        ({"colour_delta_e": 30.0}, "FAIL"),
    ],
)
def test_h1_grades(changes: dict, status: str) -> None:
    got, reason, _ = hypothesis(summary(metrics=quality(**changes)), "H1")
    assert got == status
    assert (reason is None) == (status == "PASS")


# --- H2 memory -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peaks", "status", "reduction"),
    [
        ({"peak_full_bytes": 1000, "peak_fragment_bytes": 500}, "PASS", 0.5),
        ({"peak_full_bytes": 1000, "peak_fragment_bytes": 900}, "WARN", 0.1),
        ({"peak_full_bytes": 1000, "peak_fragment_bytes": 1000}, "FAIL", 0.0),
        ({"peak_full_bytes": 1000, "peak_fragment_bytes": 1200}, "FAIL", -0.2),
        ({"peak_full_bytes": 1000}, "UNAVAILABLE", None),
        ({"kind": "cuda_max_allocated"}, "UNAVAILABLE", None),
    ],
)
def test_h2_grades_on_measured_peaks(peaks: dict, status: str, reduction: float | None) -> None:
    """H2 is decided on measured peak memory (issue 12), never on weight bytes."""
    got, reason, values = hypothesis(summary(memory=peaks), "H2")
    assert got == status
    assert values["peak_reduction"] == (None if reduction is None else pytest.approx(reduction))
    assert (reason is None) == (status == "PASS")


@pytest.mark.parametrize(
    ("memory", "reduction"),
    [
        ({"full_bytes": 1000, "fragment_bytes": 500}, 0.5),
        ({"full_bytes": 1000, "fragment_bytes": 1200}, -0.2),
    ],
)
def test_h2_is_unavailable_on_weight_bytes_alone(memory: dict, reduction: float) -> None:
    got, reason, values = hypothesis(summary(memory=memory), "H2")
    assert got == "UNAVAILABLE"
    assert "not measured" in reason
    assert values["reduction"] == pytest.approx(reduction)  # reported, not decided on
    assert values["peak_reduction"] is None
    probe_failed = {**memory, "peak_reason": "memory probe failed: out of memory"}
    assert hypothesis(summary(memory=probe_failed), "H2")[1] == probe_failed["peak_reason"]


def test_h2_peak_can_be_higher_than_the_full_models_and_fails() -> None:
    # sd15-shape, int8: weight bytes drop by 3/4 but the measured peak RSS rises
    memory = {
        "full_bytes": 4,
        "fragment_bytes": 1,
        "peak_full_bytes": 3557,
        "peak_fragment_bytes": 4960,
    }
    status, reason, values = hypothesis(summary(memory=memory), "H2")
    assert status == "FAIL" and "peak_reduction" in reason
    assert values["reduction"] == 0.75 and values["peak_reduction"] < 0


def test_h2_reports_peak_reduction_and_kind() -> None:
    memory = {**MEMORY, "peak_full_bytes": 4000, "peak_fragment_bytes": 3000}
    _, _, values = hypothesis(summary(memory=memory), "H2")
    assert values["peak_reduction"] == 0.25
    assert values["kind"] == "cpu_param_bytes"


def test_byte_counts_stay_exact_integers() -> None:
    memory = {"full_bytes": 1_234_567_891, "fragment_bytes": 617_283_945}
    result = summary(memory=memory)
    _, _, values = hypothesis(result, "H2")
    assert (values["full_bytes"], values["fragment_bytes"]) == (1_234_567_891, 617_283_945)
    assert result["memory"] == memory
    assert values["reduction"] == 0.5


def test_h2_refuses_nonsense_bytes() -> None:
    with pytest.raises(InvalidInputError, match="memory.full_bytes"):
        summary(memory={"full_bytes": 0, "fragment_bytes": 1})
    with pytest.raises(InvalidInputError, match="memory.fragment_bytes"):
        summary(memory={"full_bytes": 10, "fragment_bytes": -1})


# --- H3 reuse --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reuse", "status"),
    [
        ({"pass_rate": 0.9, "n": 10}, "PASS"),
        ({"pass_rate": 0.8, "n": 10}, "PASS"),
        ({"pass_rate": 0.5, "n": 10}, "WARN"),
        ({"pass_rate": 0.4, "n": 10}, "WARN"),
        ({"pass_rate": 0.2, "n": 10}, "FAIL"),
        ({"pass_rate": None, "n": 0}, "UNAVAILABLE"),
        (None, "UNAVAILABLE"),
    ],
)
def test_h3_grades(reuse: dict | None, status: str) -> None:
    got, reason, _ = hypothesis(summary(reuse=reuse), "H3")
    assert got == status
    if status == "UNAVAILABLE":
        assert reason == REUSE_NOT_MEASURED


def test_h3_refuses_pass_rate_above_one() -> None:
    with pytest.raises(InvalidInputError, match="pass_rate"):
        summary(reuse={"pass_rate": 1.5, "n": 2})


# --- H4 speed --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("full_ms", "fragment_ms", "status"),
    [
        (2000.0, 1000.0, "PASS"),
        (1500.0, 1000.0, "PASS"),
        (1200.0, 1000.0, "WARN"),
        (1000.0, 1000.0, "FAIL"),
        (900.0, 1000.0, "FAIL"),
        (None, 1000.0, "UNAVAILABLE"),
    ],
)
def test_h4_grades(full_ms: float | None, fragment_ms: float, status: str) -> None:
    performance = {**PERFORMANCE, "latency_full_ms": full_ms, "latency_fragment_ms": fragment_ms}
    got, _, values = hypothesis(summary(performance=performance), "H4")
    assert got == status
    expected = None if full_ms is None else pytest.approx(full_ms / fragment_ms)
    assert values["speedup"] == expected
    assert (values["batch_size"], values["steps"]) == (4, 20)


def test_no_speed_up_is_claimed_for_a_fragment_that_failed_its_gate() -> None:
    """A 2x faster fragment whose one seed turned red is not a speed-up (issue 16, item 5)."""
    metrics = quality(
        num_images=2,
        ssim=0.95,
        ssim_per_image=[0.96, 0.94],
        psnr_per_image=[30.0, 30.0],
        lpips_per_image=[0.05, 0.05],
        clip_delta_per_image=[0.01, 0.01],
        colour_delta_e=15.0,
        colour_delta_e_per_image=[1.0, 29.0],
    )
    result = summary(metrics=metrics)
    assert result["gate"]["passed"] is False
    for name in ("H4", "H5"):
        status, reason, _ = hypothesis(result, name)
        assert status == "FAIL" and "failed its quality gate" in reason
    assert hypothesis(result, "H4")[2]["speedup"] == pytest.approx(2.0)  # still reported
    status, reason, values = hypothesis(result, "H1")
    assert status == "FAIL" and "colour" in reason
    assert (values["colour_delta_e"], values["colour_delta_e_worst"]) == (15.0, 29.0)


# --- H5 break-even ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overhead_s", "status", "variants"),
    [
        (8.0, "PASS", 8.0),  # saving 1 s per image
        (10.0, "PASS", 10.0),
        (15.0, "WARN", 15.0),
        (25.0, "FAIL", 25.0),
        (None, "UNAVAILABLE", None),
    ],
)
def test_h5_grades(overhead_s: float | None, status: str, variants: float | None) -> None:
    got, _, values = hypothesis(
        summary(performance={**PERFORMANCE, "overhead_s": overhead_s}), "H5"
    )
    assert got == status
    assert values["break_even_variants"] == variants


def test_h5_credits_the_delivered_full_model_images_and_keeps_the_old_figure_beside() -> None:
    # 2 s full, 1 s fragment per image; 14 s of chain made 4 full-model images delivered as
    # variants (worth 8 s): 6 s beyond them / 1 s saved = 6; the seed's definition: 14 / 1.
    performance = {
        **PERFORMANCE,
        "overhead_s": 14.0,
        "chain_s": 14.0,
        "delivered_full_model_images": 4,
    }
    status, reason, values = hypothesis(summary(performance=performance), "H5")
    assert (status, reason) == ("PASS", None)
    assert values["break_even_variants"] == pytest.approx(6.0)
    assert values["break_even_variants_old"] == pytest.approx(14.0)
    assert (values["chain_s"], values["delivered_full_model_images"]) == (14.0, 4)
    # nothing delivered: the two definitions agree, and the same chain misses the limit
    status, _, values = hypothesis(
        summary(performance={**performance, "delivered_full_model_images": 0}), "H5"
    )
    assert status == "WARN" and values["break_even_variants"] == pytest.approx(14.0)
    # a chain that cost less than its delivered images has paid back before any variant
    values = hypothesis(
        summary(performance={**performance, "chain_s": 6.0, "delivered_full_model_images": 8}),
        "H5",
    )[2]
    assert values["break_even_variants"] == 0.0


@pytest.mark.parametrize("delivered", [-1, 2.5, True, "4"])
def test_h5_refuses_a_bad_delivered_count(delivered) -> None:
    performance = {**PERFORMANCE, "delivered_full_model_images": delivered}
    with pytest.raises(InvalidInputError, match="delivered_full_model_images"):
        summary(performance=performance)


def test_h5_fails_with_null_value_when_fragment_is_not_faster() -> None:
    performance = {**PERFORMANCE, "latency_full_ms": 1000.0, "latency_fragment_ms": 1100.0}
    result = summary(performance=performance)
    status, reason, values = hypothesis(result, "H5")
    assert status == "FAIL"
    assert reason == NEVER_PAYS_BACK
    assert values["break_even_variants"] is None and values["break_even_variants_old"] is None
    assert values["saving_per_image_s"] == pytest.approx(-0.1)
    json.dumps(result, allow_nan=False)


# --- comparison image ------------------------------------------------------------------------


def solid(color: tuple[float, float, float], n: int, height: int = 32, width: int = 32):
    return torch.tensor(color).view(1, 3, 1, 1).expand(n, 3, height, width).clone()


@pytest.mark.parametrize(("seeds", "height", "width"), [([1, 2, 3, 4], 32, 32), ([7, 9], 32, 64)])
def test_compare_image_lays_full_above_fragment(
    tmp_path: Path, seeds: list[int], height: int, width: int
) -> None:
    n = len(seeds)
    full = solid((1.0, 0.0, 0.0), n, height, width)
    fragment = solid((0.0, 0.0, 1.0), n, height, width)
    path = save_compare_image(full, fragment, seeds, tmp_path / "out" / "compare.png", title="t")
    assert path == tmp_path / "out" / "compare.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB")).astype(int)
    fig_h, fig_w, _ = pixels.shape
    grid_ratio = (n * width) / (2 * height)
    assert fig_w / fig_h == pytest.approx(grid_ratio, rel=0.25)
    red = np.argwhere((pixels == [255, 0, 0]).all(axis=-1))
    blue = np.argwhere((pixels == [0, 0, 255]).all(axis=-1))
    assert len(red) == len(blue) > 0.3 * fig_w * fig_h / 2
    assert red[:, 0].max() < blue[:, 0].min()


def test_compare_image_refuses_wrong_seed_count(tmp_path: Path) -> None:
    images = solid((0.5, 0.5, 0.5), 2)
    with pytest.raises(InvalidInputError, match="2 image pairs but 3 seeds"):
        save_compare_image(images, images, [1, 2, 3], tmp_path / "x.png")


def test_tensor_to_pil_rounds_to_uint8() -> None:
    images = solid((1.0, 0.5, 0.0), 2, 8, 16)
    pil = tensor_to_pil(images)
    assert len(pil) == 2
    assert (pil[0].mode, pil[0].size) == ("RGB", (16, 8))
    assert pil[1].getpixel((3, 5)) == (255, 128, 0)
    with pytest.raises(InvalidInputError, match="shape"):
        tensor_to_pil(torch.rand(3, 8, 8))


def test_results_page_says_which_fragment_was_used():
    from fragjobs.bench.results import render_markdown

    hyp = {
        name: {"status": "PASS", "name": name.lower(), "reason": None, "values": {}}
        for name in ("H1", "H2", "H3", "H4", "H5")
    }
    attempt = {"key": "k1", "heads_kept": 60, "heads_total": 80, "passed": False}
    run = {"prompt": "a red circle", "folder": "results/00", "key": "k2", "passed": True}
    results = {
        "model": "shapes",
        "command": "fragjobs results --out docs",
        "seconds": 1.0,
        "machine": "test",
        "runs": [
            {**run, "hypotheses": hyp, "attempts": [attempt, {**attempt, "heads_kept": 80}]},
            {**run, "prompt": "a blue box", "hypotheses": hyp, "attempts": [attempt]},
        ],
        "ablation": [
            {"prompt": "a red circle", "heads_kept": "58/80", "own": 0.9, "other": 0.8}
            | {"model_level": 0.85, "random": 0.7}
        ],
    }
    page = render_markdown(results)
    assert "| 0 | a red circle | pass | 80/80 (2) |" in page
    assert "| 1 | a blue box | pass | 60/80 |" in page
