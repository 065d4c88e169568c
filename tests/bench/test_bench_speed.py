"""The benchmark runs every method in one process and derives ratios from its own timings."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import BENCH_SMALL

from fragjobs.bench.speed import bench_model
from fragjobs.bench.speed_report import markdown_table
from fragjobs.errors import InvalidInputError


def _bench(methods, **options):
    """bench_model on tiny-sd with conftest's BENCH_SMALL (``options`` override)."""
    return bench_model(
        "tiny-sd", **{**BENCH_SMALL, "prompt": "a dog on a jet ski", "methods": methods, **options}
    )


def test_bench_times_methods_interleaved_and_reports_break_even(tmp_path):
    result = _bench(
        ("int8", "caching@0.8", "tome_0.5", "taylorseer_2", "fbc_0.05"),
        profile_seeds=(0, 1),
        fragments_dir=tmp_path,
    )
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["full", "int8", "caching@0.8", "tome_0.5", "taylorseer_2", "fbc_0.05"]
    assert rows["full"]["speedup"] == 1.0 and rows["full"]["ssim"] == 1.0
    assert rows["int8"]["bytes_ratio"] < 0.6  # int8 weights: fewer bytes held
    caching = rows["caching@0.8"]
    assert caching["fidelity"] == 0.8 and caching["validate_s"] > 0
    delivered = 2 + 2  # profiling seeds and evaluation seeds (one batch) of the full model
    for row in (rows["int8"], caching, rows["taylorseer_2"]):
        assert row["latency_min_ms"] <= row["latency_ms"] <= row["latency_max_ms"]
        spread = row["latency_max_ms"] / row["latency_min_ms"]
        assert row["spread_wide"] == (spread > 1.25)
    for row in (rows["int8"], caching):
        assert row["latency_ms"] > 0
        assert row["speedup"] == round(rows["full"]["latency_ms"] / row["latency_ms"], 3)
        saved = (rows["full"]["latency_ms"] - row["latency_ms"]) / 1000
        if saved > 0:
            overhead = result["profile_s"] + row["extract_s"] + row["validate_s"]
            old = overhead / saved
            assert abs(row["break_even_old"] - old) < 0.1 + 0.01 * old
            new = max(0.0, overhead - delivered * rows["full"]["latency_ms"] / 1000) / saved
            assert abs(row["break_even_delivered"] - new) < 0.1 + 0.01 * new
            assert row["break_even_delivered"] <= row["break_even_old"]
        else:
            assert row["break_even_old"] is None and row["break_even_delivered"] is None
    # a diffusers cache hook fitted to the UNet hooks its modules
    assert rows["taylorseer_2"]["hooked_modules"] > 0  # tiny-sd, 4 steps: images may not move
    # a peer that cannot run on a UNet: a row saying why, without figures
    assert "Transformer2DModel" in rows["fbc_0.05"]["unavailable"]
    assert "latency_ms" not in rows["fbc_0.05"]
    # a peer that is not installed is a row saying so, not a missing row
    assert "latency_ms" in rows["tome_0.5"] or "pip install" in rows["tome_0.5"]["unavailable"]
    # memory: each method measured in a process of its own, the fragment replayed from disk
    for name in ("full", "int8", "caching@0.8"):
        assert 0 < rows[name]["rss_held_mib"] <= rows[name]["rss_peak_mib"]
    assert (tmp_path / "int8" / "fragment.safetensors").is_file()
    table = markdown_table([result])
    assert table.count("| tiny-sd 64px 4 steps |") == 6


def test_memory_probe_replays_the_saved_fragment_in_its_own_process(tmp_path):
    from fragjobs.base_models import load_base
    from fragjobs.bench.memory import measure
    from fragjobs.config import Settings
    from fragjobs.extraction import (
        ExtractionConfig,
        HeadSelectionConfig,
        Int8Config,
        extract_fragment,
        save_fragment,
        weight_bytes,
    )
    from fragjobs.profiling import ProfileConfig, profile_prompt

    loaded = load_base("tiny-sd", settings=Settings(data_dir=tmp_path / "data"))
    prof = profile_prompt(
        loaded.pipe, "a red car", ProfileConfig(seeds=(0,), steps=2), progress=False
    )
    config = ExtractionConfig(
        HeadSelectionConfig(1.0), low_rank=None, int8=Int8Config(), caching=None
    )
    fragment, unet = extract_fragment(loaded.pipe, loaded.info, prof, config, profile_id="p")
    save_fragment(fragment, tmp_path / "int8")
    common = {"prompt": "a red car", "steps": 2, "size": None, "batch_size": 1}
    full = measure("tiny-sd", **common)
    int8 = measure("tiny-sd", fragment_dir=tmp_path / "int8", **common)
    assert full["unet_bytes"] == weight_bytes(loaded.pipe.unet)
    assert weight_bytes(unet) < 0.6 * full["unet_bytes"]  # stored and extracted as int8
    # loaded on a CPU, int8 layers are dequantised once (no faster int8 matmul here): the
    # probe measures the float weights they then hold, the memory trade of issue 16.2
    assert int8["int8_execution"] == "float" and full["int8_execution"] is None
    assert int8["unet_bytes"] == full["unet_bytes"]
    assert int8["fragment"] == str(tmp_path / "int8") and full["fragment"] is None
    assert full["rss_held_bytes"] > full["unet_bytes"]  # the weights are resident, and more


def test_methods_combine_techniques_with_plus():
    from fragjobs.bench.methods import extraction_config

    config = extraction_config("low_rank+int8+caching", 0.75, 0.95)
    assert config.heads.threshold == 1.0 and config.heads.min_ssim is None
    assert config.low_rank is not None and config.int8 is not None
    assert config.caching is not None and config.caching.min_ssim == 0.95
    everything = extraction_config("all", 0.75, 0.9)
    assert everything.heads.threshold == 0.75 and everything.heads.min_ssim == 0.95
    assert extraction_config("int8", 0.75, 0.9).caching is None


@pytest.mark.parametrize(
    "token,field", [("noforecast", "forecast"), ("nocfg", "cfg_reuse"), ("noprobe", "probe")]
)
def test_routing_switch_tokens_turn_fields_off_or_are_refused_in_one_line(token, field):
    from fragjobs.bench.methods import extraction_config
    from fragjobs.extraction import BlockCachingConfig

    if field in {f.name for f in dataclasses.fields(BlockCachingConfig)}:
        config = extraction_config(f"caching+{token}", 0.75, 0.9)
        assert getattr(config.caching, field) is False
        plain = extraction_config("caching", 0.75, 0.9).caching
        assert getattr(plain, field) == getattr(BlockCachingConfig(), field)
        assert getattr(extraction_config(f"all+{token}", 0.75, 0.9).caching, field) is False
    else:
        with pytest.raises(InvalidInputError, match=f"no field '{field}'") as caught:
            extraction_config(f"caching+{token}", 0.75, 0.9)
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidInputError, match="add \\+caching"):
        extraction_config(f"int8+{token}", 0.75, 0.9)


def test_unknown_methods_are_refused_before_any_work():
    from fragjobs.bench.methods import check_methods

    for bad in ("caching+fast", "caching@high", "warpcache_3", "deepcache_x"):
        with pytest.raises(InvalidInputError):
            check_methods((bad,), 0.75, 0.9)
    check_methods(("caching@0.98", "all", "deepcache_3", "magcache_0.1"), 0.75, 0.9)


def test_peak_rss_is_the_process_own_not_inherited_from_its_parent():
    import subprocess
    import sys

    from fragjobs.generation.memory import peak_rss_bytes

    ballast = b"\x01" * (1536 * 2**20)  # 1.5 GiB touched in this process
    assert peak_rss_bytes() >= len(ballast)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fragjobs.generation.memory import peak_rss_bytes; print(peak_rss_bytes())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    del ballast
    assert int(child.stdout.strip()) < 1024 * 2**20  # ru_maxrss would say >= 1.5 GiB here


def test_the_model_level_row_pays_only_its_gate_and_reports_its_one_off_build(tmp_path):
    result = _bench(
        ("model_level", "deepcache_3"),
        profile_seeds=(0, 1),
        eval_seeds=4,
        fragments_dir=tmp_path,
        memory=False,
    )
    rows = {row["method"]: row for row in result["rows"]}
    shared = rows["model_level"]
    assert shared["build_s"] > 0 and shared["gate_s"] > 0 and shared["fidelity"] == 0.9
    assert len(shared["calibration_prompts"]) == 6
    # int8 would compute as float on this CPU: left out, so the gate shares the warm-up steps
    assert shared["techniques"] == "caching" and shared["gate_shared_steps"] >= 1
    assert (tmp_path / "model_level" / "manifest.json").is_file()
    assert result["profile_s"] is None  # no prompt's own fragment: the prompt is not profiled
    saved = (rows["full"]["latency_ms"] - shared["latency_ms"]) / 1000
    if saved > 0:  # the gate's seconds beyond its four delivered full-model images
        beyond = max(0.0, shared["gate_s"] - 4 * rows["full"]["latency_ms"] / 1000)
        assert abs(shared["break_even_delivered"] - beyond / saved) < 0.1 + 0.01 * beyond / saved
        assert abs(shared["break_even_old"] - shared["gate_s"] / saved) < 0.1 + 0.01 * (
            shared["gate_s"] / saved
        )
    else:
        assert shared["break_even_delivered"] is None
    # it counts as a fragment point in the dominance list, not as a peer
    from fragjobs.bench.speed_report import fragment_rows, peer_rows

    assert shared in fragment_rows(result) and shared not in peer_rows(result)
    with pytest.raises(InvalidInputError, match="not a fidelity"):
        _bench(("model_level@high",), repeats=1, prompt="x")
