"""Every peer builds and runs one tiny generation on the trained `shapes` UNet, or says why not."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fragjobs.bench.diffusers_cache import (
    RUN_HOOK,
    PeerUnavailableError,
    count_hooks,
    transformer_models,
)
from fragjobs.bench.peers import PEERS, calibrate_peer, describe_peer, parse_peer, peer_pipeline
from fragjobs.errors import InvalidInputError

PROMPT = "a red circle on the left"
SEEDS = [100, 101]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from fragjobs.bench.loading import load_for_bench
    from fragjobs.generation import generate_images

    loaded, gen = load_for_bench("shapes", size=None, steps=10, batch_size=2)
    full = generate_images(loaded.pipe, PROMPT, SEEDS, gen)
    return loaded.pipe, gen, full


def _installed(family: str) -> bool:
    module = {"deepcache": "DeepCache", "tome": "tomesd"}.get(family)
    return module is None or importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("name", PEERS)
def test_peer_runs_a_tiny_generation_or_says_why_not(shapes, name):
    from fragjobs.generation import generate_images

    pipe, gen, full = shapes
    family, _ = parse_peer(name)
    if not _installed(family):
        with pytest.raises(ImportError), peer_pipeline(pipe, name):
            pass
        return
    calibration = calibrate_peer(
        pipe, name, gen.steps, lambda p: generate_images(p, PROMPT, [0, 1], gen)
    )
    if family == "fbc":
        with pytest.raises(PeerUnavailableError, match="Transformer2DModels holds \\[1\\]"):
            describe_peer(pipe, name, calibration)
        assert count_hooks(pipe.unet, ("fbc_leader_block_hook", "fbc_block_hook")) == 0
        return
    described = describe_peer(pipe, name, calibration)
    if family in ("taylorseer", "pab", "magcache", "fastercache"):
        assert described["hooked_modules"] > 0 and described["note"]
    with peer_pipeline(pipe, name, calibration) as run_pipe:
        first = generate_images(run_pipe, PROMPT, SEEDS, gen)
        again = generate_images(run_pipe, PROMPT, SEEDS, gen)
    assert first.shape == full.shape and torch.isfinite(first).all()
    # each generation starts from a clean cache state: the same seeds give the same images
    assert torch.allclose(first, again, atol=1e-5)
    if family != "magcache":  # MagCache may find no step cheap enough at 10 steps
        assert not torch.allclose(first, full, atol=1e-4), "the peer changed nothing"
    # switched off afterwards: no hook left, the full model's images again
    registry = getattr(pipe.unet, "_diffusers_hook", None)
    assert registry is None or RUN_HOOK not in registry.hooks
    assert torch.allclose(generate_images(pipe, PROMPT, SEEDS, gen), full, atol=1e-5)


def test_magcache_is_calibrated_per_transformer_model_on_the_given_run(shapes):
    from fragjobs.generation import generate_images

    pipe, gen, _full = shapes
    calibration = calibrate_peer(
        pipe, "magcache_0.1", gen.steps, lambda p: generate_images(p, PROMPT, [0, 1], gen)
    )
    assert calibration["steps"] == gen.steps
    modules = [name for name, _ in transformer_models(pipe.unet)]
    assert sorted(calibration["ratios"]) == sorted(modules) and len(modules) == 10  # 3+1+6
    for ratios in calibration["ratios"].values():
        assert len(ratios) == gen.steps and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert calibrate_peer(pipe, "pab_2", gen.steps, lambda p: None) is None


def test_peer_names_are_checked():
    assert parse_peer("taylorseer_4o2") == ("taylorseer", "4o2")
    for bad in ("deepcache_x", "warpcache_2", "pab_", "magcache_fast"):
        with pytest.raises(InvalidInputError):
            parse_peer(bad)
