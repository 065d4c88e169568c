"""How int8 layers compute (fragjobs.extraction.int8_exec): W8A8 with torch._int_mm, float
dequantised once, or dequantised per call, on small real layers and the tiny-sd UNet."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fragjobs.base_models import load_base
from fragjobs.config import Settings
from fragjobs.errors import InvalidInputError
from fragjobs.extraction.int8 import (
    Int8Config,
    Int8Conv2d,
    Int8Linear,
    apply_int8_,
    plan_int8,
    quantize_layers,
)
from fragjobs.extraction.int8_exec import (
    MIN_QLINEAR_WEIGHTS,
    Int8DynamicLinear,
    Int8MatmulLinear,
    choose_int8_execution,
    int8_execution,
    int_mm_available,
    qlinear_dynamic_available,
    set_int8_execution_,
)


def _int8_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    model.add_module("conv", nn.Conv2d(4, 8, 3, padding=1))
    apply_int8_(model, quantize_layers(model, plan_int8(model, Int8Config(min_params=1))))
    return model


def _run(model: nn.Module, x: torch.Tensor, image: torch.Tensor):
    with torch.no_grad():
        return model[2](model[1](model[0](x))), model.conv(image)


def test_int_mm_matches_the_dequantised_path_within_two_percent():
    reference = _int8_model()
    fast = copy.deepcopy(reference)
    report = set_int8_execution_(fast, "int_mm")
    assert (report.mode, report.int_mm_layers, report.float_layers) == ("int_mm", 2, 1)
    assert isinstance(fast[0], Int8MatmulLinear) and isinstance(reference[0], Int8Linear)
    x, image = torch.randn(3, 40, 64), torch.randn(2, 4, 8, 8)
    (expected, expected_conv), (actual, actual_conv) = (
        _run(reference, x, image),
        _run(fast, x, image),
    )
    # activations are rounded to int8 per token: each output moves by at most ~1 % of its
    # row's scale; two layers stay within 2 % of the largest output
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert 0 < error < 0.02
    assert torch.equal(actual_conv, expected_conv)  # no int8 conv kernel: Conv2d runs float


def test_qlinear_dynamic_matches_the_dequantised_path_on_large_layers_only():
    torch.manual_seed(0)
    side = 512  # 512 x 512 weights: at MIN_QLINEAR_WEIGHTS, the kernel's size
    assert side * side >= MIN_QLINEAR_WEIGHTS
    model = nn.Sequential(nn.Linear(side, side), nn.GELU(), nn.Linear(side, 32))
    apply_int8_(model, quantize_layers(model, plan_int8(model, Int8Config(min_params=1))))
    fast = copy.deepcopy(model)
    report = set_int8_execution_(fast, "qlinear_dynamic")
    assert (report.qlinear_layers, report.float_layers) == (1, 1)
    assert isinstance(fast[0], Int8DynamicLinear) and type(fast[2]) is nn.Linear
    x = torch.randn(2, 40, side)
    with torch.no_grad():
        expected, actual = model[0](x), fast[0](x)
    # activations rounded per tensor to 7 bits: within 3 % of the largest output
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert 0 < error < 0.03


def test_qlinear_dynamic_is_refused_where_the_kernel_does_not_run():
    assert qlinear_dynamic_available("cpu", torch.float32)
    assert not qlinear_dynamic_available("cpu", torch.bfloat16)  # the kernel takes float32
    model = _int8_model().to(torch.bfloat16)
    with pytest.raises(InvalidInputError, match="linear_dynamic does not run on cpu"):
        set_int8_execution_(model, "qlinear_dynamic")
    assert set_int8_execution_(model, "auto").mode == "float"


def test_float_once_is_bit_identical_to_dequantising_per_call():
    reference = _int8_model()
    once = copy.deepcopy(reference)
    report = set_int8_execution_(once, "float")
    assert (report.mode, report.float_layers, report.int_mm_layers) == ("float", 3, 0)
    assert type(once[0]) is nn.Linear and type(once.conv) is nn.Conv2d
    x, image = torch.randn(3, 40, 64), torch.randn(2, 4, 8, 8)
    for expected, actual in zip(_run(reference, x, image), _run(once, x, image), strict=True):
        assert torch.equal(expected, actual)


def test_int_mm_falls_back_to_dequantising_on_few_rows():
    reference = _int8_model()
    fast = copy.deepcopy(reference)
    set_int8_execution_(fast, "int_mm")
    x = torch.randn(1, 16, 64)  # 16 rows: below _int_mm's shape rules on CUDA, kept off it
    with torch.no_grad():
        assert torch.equal(fast[0](x), reference[0](x))


def test_auto_falls_back_to_float_where_no_int8_matmul_is_fast():
    # on CPU no int8 matmul was measured faster than float32: the real condition here
    assert choose_int8_execution("cpu", torch.float32)[0] == "float"
    model = _int8_model()
    report = set_int8_execution_(model, "auto")
    assert (report.mode, report.requested, int8_execution(model)) == ("float", "auto", "float")
    assert "no int8 matmul measured faster" in report.reason


def test_int_mm_is_refused_where_the_op_does_not_run():
    # the W8A8 path rescales in the activations' dtype; float64 is not one it computes in
    assert int_mm_available("cpu", torch.float32)
    assert not int_mm_available("cpu", torch.float64)
    assert not int_mm_available("meta", torch.float32)  # no kernel result on meta
    model = _int8_model().double()
    with pytest.raises(InvalidInputError, match="does not run on cpu with torch.float64"):
        set_int8_execution_(model, "int_mm")
    assert isinstance(model[0], Int8Linear)  # nothing changed
    assert set_int8_execution_(model, "auto").mode == "float"


def test_modes_are_checked_and_not_changed_after_the_fact():
    model = _int8_model()
    with pytest.raises(InvalidInputError, match="int8 execution must be one of"):
        set_int8_execution_(model, "fast")
    set_int8_execution_(model, "float")
    with pytest.raises(InvalidInputError, match="already run as 'float'; reload"):
        set_int8_execution_(model, "int_mm")
    assert set_int8_execution_(model, "auto").mode == "float"
    assert set_int8_execution_(nn.Linear(4, 4)).mode is None  # no int8 layer


def test_dequantize_keeps_int8_storage():
    model = _int8_model()
    report = set_int8_execution_(model, "dequantize")
    assert report.dequantize_layers == 3 and isinstance(model.conv, Int8Conv2d)
    assert model[0].weight_int8.dtype == torch.int8


def test_tiny_sd_unet_in_int_mm_mode_keeps_its_output_close(tmp_path):
    unet = load_base("tiny-sd", device="cpu", settings=Settings(data_dir=tmp_path)).pipe.unet
    apply_int8_(unet, quantize_layers(unet, plan_int8(unet, Int8Config())))
    fast = copy.deepcopy(unet)
    report = set_int8_execution_(fast, "int_mm")
    assert report.int_mm_layers > 0 and report.float_layers > 0
    torch.manual_seed(1)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    with torch.no_grad():
        expected = unet(sample, 10, encoder_hidden_states=context).sample
        actual = fast(sample, 10, encoder_hidden_states=context).sample
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert 0 < error < 0.05


def test_the_setting_chooses_how_the_chains_fragment_computes(settings, monkeypatch):
    """FRAGJOBS_INT8_EXECUTION reaches the fragment the chain builds for generation; a bad
    value is one ConfigError line."""
    from fragjobs.chain.fragments import fragment_unet
    from fragjobs.config import get_settings
    from fragjobs.errors import ConfigError
    from fragjobs.extraction import ExtractionConfig, HeadSelectionConfig, extract_fragment
    from fragjobs.profiling import ProfileConfig, profile_prompt

    loaded = load_base("tiny-sd", device="cpu", settings=settings)
    prof = profile_prompt(
        loaded.pipe, "a red circle", ProfileConfig(seeds=(0,), steps=2), progress=False
    )
    config = ExtractionConfig(heads=HeadSelectionConfig(threshold=1.0), caching=None)
    fragment, _ = extract_fragment(loaded.pipe, loaded.info, prof, config, profile_id="p")
    assert fragment.manifest.compression.int8.precision_map  # it has int8 layers
    assert int8_execution(fragment_unet(loaded, fragment)) == "float"  # auto on a CPU
    monkeypatch.setenv("FRAGJOBS_INT8_EXECUTION", "dequantize")
    get_settings.cache_clear()
    assert int8_execution(fragment_unet(loaded, fragment)) == "dequantize"
    monkeypatch.setenv("FRAGJOBS_INT8_EXECUTION", "fast")
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="FRAGJOBS_INT8_EXECUTION"):
        fragment_unet(loaded, fragment)
