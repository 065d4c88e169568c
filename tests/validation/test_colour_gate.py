"""The colour check and the worst-seed gate: what a person sees, on the shapes vocabulary.

The images are scenes drawn by :func:`fragjobs.builtin.scenes.render`, the shapes model's own
training pictures: a shape that keeps its outline but changes colour (green to near-black,
orange to red) keeps SSIM at 0.96-0.98, and only the colour check sees it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fragjobs.builtin.scenes import SceneSpec, ShapeSpec, render
from fragjobs.errors import InvalidInputError
from fragjobs.validation import QualityMetrics, Thresholds, compute_quality, evaluate_gate
from fragjobs.validation.colour import ciede2000, colour_delta_e, dominant_colours, rgb_to_lab
from fragjobs.validation.gate import load_thresholds

PROMPT = "a small orange circle at the top"
SEEDS = [1000, 1001, 1002, 1003]


@pytest.fixture()
def thresholds() -> Thresholds:
    return load_thresholds(Path(__file__).parents[2] / "fragjobs" / "thresholds.yaml")


def scene(
    colour: str,
    shape: str = "circle",
    *,
    size: str = "small",
    position: str = "top",
    background: str = "teal",
    **jitter: float,
) -> SceneSpec:
    return SceneSpec(background, (ShapeSpec(shape, colour, size, position, **jitter),))


# --- CIELAB and CIEDE2000 ----------------------------------------------------------------------

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula", test data pairs 1, 7,
# 17 and 25.
SHARMA_PAIRS = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
]


def test_ciede2000_matches_the_published_test_data() -> None:
    first = torch.tensor([p[0] for p in SHARMA_PAIRS])
    second = torch.tensor([p[1] for p in SHARMA_PAIRS])
    expected = torch.tensor([p[2] for p in SHARMA_PAIRS], dtype=torch.float64)
    assert torch.allclose(ciede2000(first, second), expected, atol=1e-4)
    assert torch.allclose(ciede2000(second, first), expected, atol=1e-4)  # symmetric
    assert float(ciede2000(first[0], first[0])) == 0.0


def test_rgb_to_lab_of_white_and_red() -> None:
    colours = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).view(2, 3, 1, 1)
    lab = rgb_to_lab(colours).flatten(1)
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.01)
    assert lab[1].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)


def test_dominant_colours_are_the_background_and_the_shape() -> None:
    image = render([scene("orange", size="large", background="grey")])
    background, foreground = dominant_colours(rgb_to_lab(image))
    swatches = torch.tensor([[128, 128, 128], [245, 140, 20]], dtype=torch.float64) / 255.0
    grey, orange = rgb_to_lab(swatches.view(2, 3, 1, 1)).flatten(1)
    assert float(ciede2000(background[0], grey)) < 1.0
    assert float(ciede2000(foreground[0], orange)) < 2.0


def test_a_shape_that_vanished_reads_as_background() -> None:
    with_shape = render([scene("green", background="grey")])
    background, foreground = dominant_colours(rgb_to_lab(torch.full_like(with_shape, 0.5)))
    assert torch.equal(background, foreground)
    assert colour_delta_e(with_shape, torch.full_like(with_shape, 128 / 255))[0] > 20.0


# --- what SSIM misses --------------------------------------------------------------------------

COLOUR_FLIPS = [
    pytest.param(
        scene("green", "star", background="white"),
        scene("black", "star", background="white"),
        id="green-to-near-black-star",
    ),  # noqa: E501
    pytest.param(scene("orange"), scene("red"), id="orange-to-red-circle-on-teal"),
    pytest.param(
        scene("orange", background="grey"),
        scene("red", background="grey"),
        id="orange-to-red-circle-on-grey",
    ),  # noqa: E501
    pytest.param(
        scene("yellow", "triangle", background="grey"),
        scene("orange", "triangle", background="grey"),
        id="yellow-to-orange-triangle",
    ),  # noqa: E501
]


@pytest.mark.parametrize(("before", "after"), COLOUR_FLIPS)
def test_a_colour_flip_that_ssim_passes_fails_the_colour_check(
    before: SceneSpec, after: SceneSpec, thresholds: Thresholds
) -> None:
    metrics = compute_quality(render([before]), render([after]), PROMPT)
    assert metrics.ssim_per_image[0] >= 0.95  # SSIM alone passes it with room to spare
    assert metrics.colour_delta_e_per_image[0] > 2 * thresholds.colour_delta_e_max
    gate = evaluate_gate(metrics, thresholds, seeds=[1002])
    assert not gate.passed
    ssim, colour = gate.checks[:2]
    assert ssim.status == "PASS"
    assert (colour.name, colour.status, colour.seed) == ("colour_delta_e", "FAIL", 1002)
    assert "seed 1002" in colour.reason and "colour_delta_e" in colour.reason


FAITHFUL = [
    pytest.param(scene("orange"), scene("orange", shade=0.96, dx=0.5), id="shade-and-offset"),
    pytest.param(
        scene("green", "star", background="white"),
        scene("green", "star", background="white", scale=1.05, rotation=4.0),
        id="scale-and-rotation",
    ),  # noqa: E501
    pytest.param(
        scene("black", "square", size="large", background="grey"),
        scene("black", "square", size="large", background="grey", shade=1.1),
        id="near-black-shade",
    ),  # noqa: E501
]


@pytest.mark.parametrize(("full", "fragment"), FAITHFUL)
def test_the_same_scene_drawn_with_a_little_jitter_passes(
    full: SceneSpec, fragment: SceneSpec, thresholds: Thresholds
) -> None:
    metrics = compute_quality(render([full]), render([fragment]), PROMPT)
    gate = evaluate_gate(metrics, thresholds)
    assert gate.checks[1].status == "PASS", gate.checks[1]
    assert metrics.colour_delta_e_per_image[0] < thresholds.colour_delta_e_max / 2


# --- the worst seed decides ----------------------------------------------------------------------


def test_one_colour_flip_among_good_seeds_fails_although_the_mean_passes(
    thresholds: Thresholds,
) -> None:
    full = render([scene("orange")] * 4)
    fragment = render([scene("orange", shade=0.97)] * 2 + [scene("red"), scene("orange")])
    metrics = compute_quality(full, fragment, PROMPT)
    assert metrics.colour_delta_e < thresholds.colour_delta_e_max  # the mean would pass
    assert metrics.ssim >= thresholds.ssim_min
    gate = evaluate_gate(metrics, thresholds, SEEDS)
    assert not gate.passed
    colour = gate.checks[1]
    assert (colour.seed, colour.image, colour.status) == (1002, 2, "FAIL")
    assert colour.value == max(metrics.colour_delta_e_per_image)
    assert colour.mean == pytest.approx(metrics.colour_delta_e)


def test_one_ssim_outlier_among_good_seeds_fails_although_the_mean_passes(
    thresholds: Thresholds,
) -> None:
    generator = torch.Generator().manual_seed(0)
    full = render([scene("orange", size="large", background="grey")] * 4)
    fragment = full.clone()
    fragment[3] = (fragment[3] + 0.03 * torch.randn(fragment[3].shape, generator=generator)).clamp(
        0, 1
    )
    metrics = compute_quality(full, fragment, PROMPT)
    assert metrics.ssim >= thresholds.ssim_min > min(metrics.ssim_per_image)
    gate = evaluate_gate(metrics, thresholds, SEEDS)
    ssim = gate.checks[0]
    assert not gate.passed
    assert (ssim.status, ssim.seed, ssim.value) == ("FAIL", 1003, min(metrics.ssim_per_image))
    assert "seed 1003" in ssim.reason


def test_without_seeds_the_reason_names_the_image(thresholds: Thresholds) -> None:
    full = render([scene("orange"), scene("orange")])
    fragment = render([scene("orange"), scene("red")])
    colour = evaluate_gate(compute_quality(full, fragment, PROMPT), thresholds).checks[1]
    assert colour.seed is None and colour.image == 1 and "on image 1" in colour.reason


def test_seeds_must_name_every_image(thresholds: Thresholds) -> None:
    images = render([scene("orange")] * 2)
    with pytest.raises(InvalidInputError, match="seeds name 3 images"):
        evaluate_gate(compute_quality(images, images, PROMPT), thresholds, [1, 2, 3])


def test_metrics_recorded_before_the_colour_check_do_not_pass(thresholds: Thresholds) -> None:
    images = render([scene("orange")])
    old = compute_quality(images, images, PROMPT).model_dump()
    for name in ("colour_delta_e", "colour_delta_e_per_image"):
        old.pop(name)
    gate = evaluate_gate(QualityMetrics(**old), thresholds)
    assert not gate.passed
    assert gate.checks[1].status == "UNAVAILABLE" and "not measured" in gate.checks[1].reason


def test_the_limit_separates_colour_names_but_not_shades_of_one(thresholds: Thresholds) -> None:
    """Every named colour at its darkest vs lightest shade (the renderer's 0.9-1.1) passes;
    every two different names fail, the closest pair (blue, purple) included."""
    from itertools import combinations

    from fragjobs.builtin.scenes import BACKGROUNDS, COLOURS

    def lab(rgb: tuple[int, int, int], shade: float = 1.0) -> torch.Tensor:
        pixel = (torch.tensor(rgb, dtype=torch.float64) * shade / 255.0).clamp(0, 1)
        return rgb_to_lab(pixel.view(1, 3, 1, 1)).flatten()

    limit = thresholds.colour_delta_e_max
    for rgb in COLOURS.values():
        assert float(ciede2000(lab(rgb, 0.9), lab(rgb, 1.1))) < limit
    for table in (COLOURS, BACKGROUNDS):
        for first, second in combinations(table.values(), 2):
            assert float(ciede2000(lab(first), lab(second))) > limit
