"""Tests of fragjobs.validation: quality metrics and the threshold gate."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fragjobs.config import get_settings
from fragjobs.errors import ConfigError, InvalidInputError
from fragjobs.validation import (
    PSNR_CAP_DB,
    QualityMetrics,
    Thresholds,
    compute_quality,
    evaluate_gate,
    load_thresholds,
)

PROMPT = "a red cube on a table"


def smooth_images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images with structure (random low-frequency patterns), as a decoder would make."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def noisy(images: torch.Tensor, amount: float, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (images + amount * torch.randn(images.shape, generator=generator)).clamp(0, 1)


@pytest.fixture()
def thresholds() -> Thresholds:
    return load_thresholds(Path(__file__).parents[2] / "fragjobs" / "thresholds.yaml")


def write_thresholds(path: Path, **changes: object) -> Path:
    values = {
        "clip_delta_max": 0.03,
        "lpips_max": 0.15,
        "ssim_min": 0.85,
        "colour_delta_e_max": 10,
        "vram_reduction_min": 0.25,
        "batch_speedup_min": 1.5,
        "reuse_pass_rate_min": 0.8,
        "break_even_max_variants": 10,
    }
    values.update(changes)
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in values.items()))
    return path


# --- metrics ------------------------------------------------------------------------------


def test_identical_images_give_perfect_scores_and_null_lpips_clip() -> None:
    images = smooth_images()
    metrics = compute_quality(images, images.clone(), PROMPT)
    assert metrics.ssim == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim_per_image == pytest.approx([1.0] * 3, abs=1e-6)
    assert metrics.psnr_db == PSNR_CAP_DB
    assert metrics.psnr_per_image == [PSNR_CAP_DB] * 3
    assert (metrics.num_images, metrics.height, metrics.width) == (3, 32, 32)
    assert metrics.lpips is None
    assert "FRAGJOBS_LPIPS_WEIGHTS_PATH" in metrics.lpips_reason
    assert metrics.clip_full is metrics.clip_fragment is metrics.clip_delta is None
    assert "FRAGJOBS_CLIP_MODEL_PATH" in metrics.clip_reason


def test_noise_lowers_ssim_and_psnr_per_image() -> None:
    full = smooth_images()
    slightly = compute_quality(full, noisy(full, 0.02), PROMPT)
    strongly = compute_quality(full, noisy(full, 0.3), PROMPT)
    assert 0.85 < slightly.ssim < 1.0
    assert strongly.ssim < 0.5
    assert strongly.psnr_db < slightly.psnr_db < PSNR_CAP_DB
    assert len(strongly.ssim_per_image) == len(strongly.psnr_per_image) == 3
    assert strongly.ssim == pytest.approx(sum(strongly.ssim_per_image) / 3)


@pytest.mark.parametrize(("size", "kernel"), [(32, 7), (64, 11)])
def test_ssim_window_fits_the_image_size(size: int, kernel: int) -> None:
    from torchmetrics.functional.image import structural_similarity_index_measure

    full = smooth_images(size=size)
    fragment = noisy(full, 0.1)
    expected = structural_similarity_index_measure(
        fragment, full, data_range=1.0, kernel_size=kernel, reduction="none"
    )
    assert compute_quality(full, fragment, PROMPT).ssim_per_image == pytest.approx(
        expected.tolist()
    )


def test_images_smaller_than_the_ssim_window_are_refused() -> None:
    tiny = smooth_images(n=1, size=6)
    with pytest.raises(InvalidInputError, match="SSIM window"):
        compute_quality(tiny, tiny, PROMPT)


@pytest.mark.parametrize(
    ("full", "fragment", "message"),
    [
        (torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32), "differ in shape"),
        (torch.rand(0, 3, 32, 32), torch.rand(0, 3, 32, 32), "empty"),
        (torch.rand(2, 3, 32, 32) * 1.5 + 0.1, torch.rand(2, 3, 32, 32), r"\[0, 1\]"),
        (torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), r"\(N, 3, H, W\)"),
        (
            torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
            torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
            "float tensor",
        ),
        (torch.full((1, 3, 32, 32), float("nan")), torch.rand(1, 3, 32, 32), "NaN"),
    ],
)
def test_invalid_images_are_refused(
    full: torch.Tensor, fragment: torch.Tensor, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        compute_quality(full, fragment, PROMPT)


def test_rounding_just_outside_unit_range_is_tolerated_and_empty_prompt_is_not() -> None:
    images = smooth_images()
    assert compute_quality(images * 1.0005, images, PROMPT).num_images == 3
    with pytest.raises(InvalidInputError, match="prompt"):
        compute_quality(images, images, "   ")


def test_null_metric_without_reason_is_refused() -> None:
    with pytest.raises(ValidationError, match="lpips_reason"):
        QualityMetrics(
            ssim=1.0,
            ssim_per_image=[1.0],
            psnr_db=100.0,
            psnr_per_image=[100.0],
            lpips=None,
            lpips_reason=None,
            clip_full=None,
            clip_fragment=None,
            clip_delta=None,
            clip_reason="no CLIP",
            num_images=1,
            height=32,
            width=32,
        )


# --- CLIP score with a tiny local CLIPModel ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIPModel + CLIPProcessor saved offline, as a user's local folder."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    vocab["re"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens(tokenizer("red")["input_ids"]) == [
        "<|startoftext|>",
        "re",
        "d</w>",
        "<|endoftext|>",
    ]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_delta_is_zero_for_identical_images(tiny_clip_dir: Path) -> None:
    images = smooth_images()
    metrics = compute_quality(images, images.clone(), PROMPT, clip_model_path=tiny_clip_dir)
    assert isinstance(metrics.clip_delta, float)
    assert metrics.clip_delta == 0.0
    assert metrics.clip_reason is None
    assert 0.0 <= metrics.clip_full <= 1.0
    assert metrics.clip_full == metrics.clip_fragment


def test_clip_scores_differ_for_different_images(tiny_clip_dir: Path) -> None:
    full = smooth_images(seed=0)
    fragment = smooth_images(seed=5)
    metrics = compute_quality(full, fragment, PROMPT, clip_model_path=str(tiny_clip_dir))
    assert isinstance(metrics.clip_delta, float)
    assert metrics.clip_delta != 0.0
    assert metrics.clip_delta == pytest.approx(metrics.clip_full - metrics.clip_fragment)


def test_clip_scores_are_torchmetrics_clip_score_of_each_image(tiny_clip_dir: Path) -> None:
    from torchmetrics.multimodal import CLIPScore

    from fragjobs.validation.metrics import _clip_of, to_uint8

    full, fragment = smooth_images(seed=0), smooth_images(seed=5)
    metrics = compute_quality(full, fragment, PROMPT, clip_model_path=tiny_clip_dir)
    metric = CLIPScore(model_name_or_path=lambda: _clip_of(tiny_clip_dir))
    one_at_a_time = []
    for image in to_uint8(torch.cat([full, fragment])):
        metric.reset()
        metric.update([image], [PROMPT])
        one_at_a_time.append(float(metric.compute()) / 100.0)
    half = len(full)
    assert metrics.clip_full == pytest.approx(sum(one_at_a_time[:half]) / half, abs=1e-5)
    deltas = [f - g for f, g in zip(one_at_a_time[:half], one_at_a_time[half:], strict=True)]
    assert metrics.clip_delta_per_image == pytest.approx(deltas, abs=1e-5)


def test_unloadable_clip_folder_is_a_config_error(tmp_path: Path) -> None:
    images = smooth_images(n=1)
    with pytest.raises(ConfigError, match="not a folder"):
        compute_quality(images, images, PROMPT, clip_model_path=tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a loadable local CLIPModel folder"):
        compute_quality(images, images, PROMPT, clip_model_path=tmp_path)


# --- LPIPS ---------------------------------------------------------------------------------


def test_lpips_is_null_with_reason_when_torchvision_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    images = smooth_images(n=1)
    metrics = compute_quality(images, images, PROMPT, lpips_weights_path=tmp_path / "a.st")
    assert metrics.lpips is None
    assert "torchvision is not installed" in metrics.lpips_reason


def _alexnet_features() -> torch.nn.Sequential:
    """torchvision's AlexNet ``features`` layer layout (random weights)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
    )


@pytest.fixture()
def stand_in_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``torchvision`` whose ``models.alexnet(weights=None)`` builds AlexNet's
    feature layers; torchvision itself is not installed here and must not be downloaded."""
    monkeypatch.setattr("torchmetrics.functional.image.lpips._TORCHVISION_AVAILABLE", True)
    module = types.ModuleType("torchvision")
    module.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)

    def alexnet(weights: object = None) -> types.SimpleNamespace:
        assert weights is None, "the backbone must never be downloaded"
        return types.SimpleNamespace(features=_alexnet_features())

    module.models = types.SimpleNamespace(alexnet=alexnet)
    monkeypatch.setitem(sys.modules, "torchvision", module)


def test_lpips_with_local_backbone_weights(stand_in_torchvision: None, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = {f"features.{k}": v for k, v in _alexnet_features().state_dict().items()}
    weights["classifier.1.weight"] = torch.zeros(2, 2)  # ignored, as in a full AlexNet file
    path = tmp_path / "alexnet.safetensors"
    save_file(weights, path)
    full = smooth_images(size=64)
    same = compute_quality(full, full.clone(), PROMPT, lpips_weights_path=path)
    different = compute_quality(full, noisy(full, 0.3), PROMPT, lpips_weights_path=path)
    assert same.lpips == pytest.approx(0.0, abs=1e-6)
    assert same.lpips_reason is None
    assert different.lpips > same.lpips


def test_lpips_weights_that_are_not_alexnet_are_a_config_error(
    stand_in_torchvision: None, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, path)
    images = smooth_images(n=1, size=64)
    with pytest.raises(ConfigError, match="not a torchvision AlexNet state dict"):
        compute_quality(images, images, PROMPT, lpips_weights_path=path)
    with pytest.raises(ConfigError, match=".safetensors"):
        compute_quality(images, images, PROMPT, lpips_weights_path=tmp_path / "alexnet.pth")


# --- thresholds ----------------------------------------------------------------------------


def test_packaged_thresholds_load() -> None:
    assert load_thresholds() == Thresholds(
        clip_delta_max=0.03,
        lpips_max=0.15,
        ssim_min=0.85,
        colour_delta_e_max=12,
        vram_reduction_min=0.25,
        batch_speedup_min=1.5,
        reuse_pass_rate_min=0.8,
        break_even_max_variants=10,
        required_metrics=["ssim"],
        regression={
            "ssim": {"max_delta": 0.02},
            "ssim_worst": {"max_delta": 0.05},
            "lpips": {"max_delta": 0.02},
            "clip_delta": {"max_delta": 0.01},
            "speedup": {"max_delta": 0.3, "relative": True},
            "memory_reduction": {"max_delta": 0.05},
        },
    )


def test_thresholds_path_setting_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_thresholds(tmp_path / "t.yaml", ssim_min=0.5)
    monkeypatch.setenv("FRAGJOBS_THRESHOLDS_PATH", str(path))
    get_settings.cache_clear()
    try:
        assert load_thresholds().ssim_min == 0.5
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ssim_min": 1.5}, "ssim_min"),
        ({"lpips_max": 0}, "lpips_max"),
        ({"ssim_min": True}, "ssim_min"),
        ({"batch_speedup_min": 1.0}, "batch_speedup_min"),
        ({"break_even_max_variants": 0}, "break_even_max_variants"),
        ({"colour_delta_e_max": 0}, "colour_delta_e_max: must be a number > 0"),
        ({"colour_delta_e_max": "10"}, "colour_delta_e_max"),
        ({"colour_delta_e_max": False}, "colour_delta_e_max"),
        ({"colour_delta_e": 10}, "unknown key 'colour_delta_e'"),
        ({"required_metrics": ["ssim", "colour"]}, "required_metrics: unknown metric"),
        ({"break_even_max_variants": 2.5}, "break_even_max_variants"),
        ({"ssim_minimum": 0.9}, "unknown key 'ssim_minimum'"),
        ({"required_metrics": ["ssim", "fid"]}, "required_metrics: unknown metric"),
        ({"required_metrics": "ssim"}, "required_metrics: must be a list"),
        ({"regression": {"ssim": {"max_delta": -1}}}, "regression.ssim.max_delta"),
        ({"regression": {"ssim": {"max_delta": "a"}}}, "regression.ssim.max_delta"),
        ({"regression": {"ssim": {"max_delta": 0.1, "relative": "yes"}}}, "relative"),
        ({"regression": {"ssim": {"max_delta": 0.1, "max": 1}}}, "regression.ssim.max"),
        ({"regression": {"latency_ms": {"max_delta": 1}}}, "unknown metric"),
    ],
)
def test_bad_thresholds_are_config_errors_naming_file_and_key(
    tmp_path: Path, changes: dict, message: str
) -> None:
    path = write_thresholds(tmp_path / "bad.yaml", **changes)
    with pytest.raises(ConfigError, match=message) as error:
        load_thresholds(path)
    assert str(path) in str(error.value)


def test_missing_key_unreadable_and_non_mapping_files_are_config_errors(tmp_path: Path) -> None:
    partial = tmp_path / "partial.yaml"
    partial.write_text("ssim_min: 0.9\n")
    with pytest.raises(ConfigError, match="missing key 'lpips_max'"):
        load_thresholds(partial)
    with pytest.raises(ConfigError, match="cannot read"):
        load_thresholds(tmp_path / "absent.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 0.9\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_thresholds(listing)


# --- gate ------------------------------------------------------------------------------------


def test_gate_passes_identical_images_with_unavailable_checks(thresholds: Thresholds) -> None:
    images = smooth_images()
    metrics = compute_quality(images, images, PROMPT)
    gate = evaluate_gate(metrics, thresholds)
    assert gate.passed
    assert [(c.name, c.status) for c in gate.checks] == [
        ("ssim", "PASS"),
        ("colour_delta_e", "PASS"),
        ("lpips", "UNAVAILABLE"),
        ("clip_delta", "UNAVAILABLE"),
    ]
    assert gate.checks[2].reason == metrics.lpips_reason
    assert gate.checks[3].reason == metrics.clip_reason


def test_gate_fails_noisy_images_on_ssim(thresholds: Thresholds) -> None:
    full = smooth_images()
    metrics = compute_quality(full, noisy(full, 0.3), PROMPT)
    gate = evaluate_gate(metrics, thresholds)
    assert not gate.passed
    ssim = gate.checks[0]
    assert (ssim.status, ssim.op, ssim.limit) == ("FAIL", ">=", 0.85)
    assert "ssim" in ssim.reason


def test_gate_fails_when_an_available_metric_misses(thresholds: Thresholds) -> None:
    base = compute_quality(smooth_images(), smooth_images(), PROMPT).model_dump()
    base.update(lpips=0.2, lpips_reason=None, clip_full=0.3, clip_fragment=0.29, clip_delta=0.01)
    base.update(lpips_per_image=[0.2] * 3, clip_delta_per_image=[0.01] * 3, clip_reason=None)
    gate = evaluate_gate(QualityMetrics(**base), thresholds)
    assert not gate.passed
    assert [c.status for c in gate.checks] == ["PASS", "PASS", "FAIL", "PASS"]
    base.update(lpips=0.1, lpips_per_image=[0.1] * 3)
    assert evaluate_gate(QualityMetrics(**base), thresholds).passed


def test_gate_records_the_checks_it_could_not_run_and_fails_a_required_one(
    thresholds: Thresholds,
) -> None:
    images = smooth_images()
    metrics = compute_quality(images, images, PROMPT)  # no LPIPS weights, no CLIP model
    gate = evaluate_gate(metrics, thresholds)
    assert gate.passed
    assert gate.not_run == [
        f"lpips: {metrics.lpips_reason}",
        f"clip_delta: {metrics.clip_reason}",
    ]
    strict = thresholds.model_copy(update={"required_metrics": ("ssim", "lpips")})
    gate = evaluate_gate(metrics, strict)
    assert not gate.passed
    lpips = gate.checks[2]
    assert lpips.status == "FAIL" and "required" in lpips.reason
    assert metrics.lpips_reason in lpips.reason
    assert gate.checks[3].status == "UNAVAILABLE"  # not required: recorded, not failed
