"""The speed benchmark on each denoiser family's test model: SDXL's UNet and PixArt's DiT.

Real pipelines, real peers: each row is timed, or says why it cannot run on that denoiser.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from conftest import BENCH_SMALL

from fragjobs.bench.denoisers import is_unet
from fragjobs.bench.diffusers_cache import RUN_HOOK, UNET_BLOCKS, transformer_models
from fragjobs.bench.speed import bench_model
from fragjobs.bench.speed_report import markdown_table, size_label
from fragjobs.builtin import BUILTINS
from fragjobs.families import denoiser

PROMPT = "a red circle on the left"
METHODS = (
    "caching",
    "deepcache_3",
    "tome_0.5",
    "taylorseer_2",
    "pab_2",
    "fbc_0.05",
    "fastercache_2",
)
MODELS = [
    "tiny-sdxl",
    pytest.param(
        "tiny-pixart",
        marks=pytest.mark.skipif(
            "tiny-pixart" not in BUILTINS, reason="no tiny-pixart built-in in this fragjobs"
        ),
    ),
]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning thread pools slow a run
    down a hundredfold; the benchmark's ratios are within one run, so they stay comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _bench(model: str, methods: tuple[str, ...], tmp_path, **overrides):
    arguments = {
        **BENCH_SMALL,
        "prompt": PROMPT,
        "methods": methods,
        "profile_seeds": (0, 1),
        "fragments_dir": tmp_path,
        "memory": False,
        **overrides,
    }
    return bench_model(model, **arguments)


@pytest.mark.parametrize("model", MODELS)
def test_each_family_gets_fragment_and_peer_rows(model, tmp_path):
    result = _bench(model, METHODS, tmp_path)
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["full", *METHODS]
    assert result["size"] == result["native_size"] == 64 and result["steps"] == 4
    full = rows["full"]
    assert full["speedup"] == 1.0 and full["ssim"] == 1.0
    caching = rows["caching"]
    assert caching["extract_s"] > 0 and caching["fidelity"] == 0.9
    assert caching["speedup"] == round(full["latency_ms"] / caching["latency_ms"], 3)

    net = denoiser(BUILTINS[model].build())
    names = [name for name, _ in net.named_modules()]
    attention = [n for n in names if re.search(r"transformer_blocks\.\d+\.attn[12]$", n)]
    lists = [m for _, m in transformer_models(net) if len(m.transformer_blocks) >= 2]
    if is_unet(net):
        if _installed("DeepCache"):
            assert rows["deepcache_3"]["latency_ms"] > 0
            assert rows["deepcache_3"]["ssim"] < 1.0  # it reused the deep branch
        else:
            assert "pip install deepcache" in rows["deepcache_3"]["unavailable"]
        # SDXL's first level has no attention: ToMe merges on the second (downsample 2)
        assert not getattr(net.down_blocks[0], "attentions", None)
        if _installed("tomesd"):
            assert rows["tome_0.5"]["note"].endswith("downsample <= 2")
            assert rows["tome_0.5"]["psnr_db"] < 100  # tokens were merged: images moved
        forecast = [n for n in names if re.fullmatch(UNET_BLOCKS, n)]
    else:
        for name, reason in (("deepcache_3", "UNet pipelines only"), ("tome_0.5", "ada_norm")):
            assert reason in rows[name]["unavailable"]
            assert type(net).__name__ in rows[name]["unavailable"]
            assert "latency_ms" not in rows[name]
        forecast = [n for n in names if re.fullmatch(r"transformer_blocks\.\d+", n)]
    # diffusers' hooks found the denoiser's own modules
    assert rows["taylorseer_2"]["hooked_modules"] == len(forecast) > 0
    assert rows["pab_2"]["hooked_modules"] == len(attention) > 0
    assert f"on {len(lists)} transformer-block lists" in rows["fbc_0.05"]["note"] and lists
    # FasterCache approximated the unconditional branch (SDXL: with its added conditioning)
    assert rows["fastercache_2"]["latency_ms"] > 0 and rows["fastercache_2"]["psnr_db"] < 100
    table = markdown_table([result])
    assert table.count(f"| {model} 64px 4 steps |") == len(rows)


def test_peers_switch_on_and_off_again_on_sdxl():
    from fragjobs.bench.loading import load_for_bench
    from fragjobs.bench.peers import peer_pipeline
    from fragjobs.generation import generate_images

    loaded, gen = load_for_bench("tiny-sdxl", size=None, steps=4, batch_size=2)
    pipe, seeds = loaded.pipe, [100, 101]
    full = generate_images(pipe, PROMPT, seeds, gen)
    for name in ("fastercache_2", "taylorseer_2", "fbc_0.05", "pab_2"):
        runs = []
        for _ in range(2):  # the benchmark switches each peer on for every timed batch
            with peer_pipeline(pipe, name) as run_pipe:
                runs.append(generate_images(run_pipe, PROMPT, seeds, gen))
        assert torch.allclose(runs[0], runs[1], atol=1e-5), name
        registry = pipe.unet._diffusers_hook
        assert not registry.hooks, f"{name} left {list(registry.hooks)}"
        assert RUN_HOOK not in registry.hooks
        assert torch.allclose(generate_images(pipe, PROMPT, seeds, gen), full, atol=1e-5), name


def test_steps_without_room_are_rows_saying_so(tmp_path, monkeypatch):
    import fragjobs.bench.headroom as headroom

    monkeypatch.setattr(headroom, "MARGIN_BYTES", 1 << 50)  # as if memory were short
    result = _bench("tiny-sdxl", ("caching", "taylorseer_2"), tmp_path, memory=True)
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["caching"]["unavailable"].startswith("not run: extracting a fragment")
    assert "UNet2DConditionModel" in rows["caching"]["unavailable"]
    assert "GiB of RAM available" in rows["caching"]["unavailable"]
    assert result["profile_s"] is None  # nothing to profile for
    assert rows["taylorseer_2"]["latency_ms"] > 0  # the peers are still timed
    for name in ("full", "taylorseer_2"):
        assert rows[name]["rss_note"].startswith("not run: a probe")
        assert "rss_held_mib" not in rows[name]
    assert not any(tmp_path.iterdir())  # no fragment saved


def test_size_label_says_when_a_model_ran_below_its_native_size():
    result = {"model": "sdxl-shape", "size": 128, "native_size": 512, "steps": 4}
    assert size_label(result) == "sdxl-shape 128px (native 512px) 4 steps"
    assert size_label({**result, "size": 512}) == "sdxl-shape 512px 4 steps"


def test_a_missing_peer_package_is_named_with_its_install_command():
    from fragjobs.bench.peers import missing_package

    error = ImportError("No module named 'DeepCache'", name="DeepCache")
    reason = missing_package("deepcache_3", error)
    assert "needs the deepcache package" in reason
    assert "pip install deepcache" in reason and "fragjobs[bench]" in reason
    reason = missing_package("tome_0.5", ImportError("No module named 'tomesd'", name="tomesd"))
    assert "pip install tomesd" in reason
