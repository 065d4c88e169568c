"""Dynamic routing's optional parts: forecast, CFG reuse, run-time probe (hooks and manifest)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fragjobs.errors import InvalidInputError
from fragjobs.extraction.caching import (
    BlockCachingConfig,
    CachingSchedule,
    apply_block_caching,
    caching_schedule,
    remove_block_caching,
    routing_layer,
)
from fragjobs.extraction.caching_plan import calibrate_probe, plan_cfg_steps
from fragjobs.extraction.forecast import ForecastErrors, forecast, lagrange_weights
from fragjobs.extraction.schedule import routed_cost
from fragjobs.generation import GenerationConfig, generate_images, with_unet
from fragjobs.manifest import FragmentManifest
from fragjobs.profiling import denoiser_blocks

GEN = GenerationConfig(steps=6, guidance_scale=7.5, height=64, width=64, batch_size=2)
PROMPT = "a blue square at the top"
SEEDS = [3, 4]
RESULTS = Path(__file__).parents[2] / "docs" / "results"


def _schedule(unet, **parts) -> CachingSchedule:
    """Level 0 every step, deeper blocks at steps 0, 1, 2 and 5 (three-level tiny UNet)."""
    recompute = {}
    for name in denoiser_blocks(unet):
        shallow = name in ("down_blocks.0", f"up_blocks.{len(unet.up_blocks) - 1}")
        recompute[name] = tuple(range(6)) if shallow else (0, 1, 2, 5)
    return CachingSchedule(6, recompute, 0.25, 0.5, warmup_steps=2, **parts)


def _images(pipe, unet):
    return generate_images(with_unet(pipe, unet), PROMPT, SEEDS, GEN)


def test_lagrange_forecast_is_exact_for_polynomials_of_its_order():
    steps = [1, 2, 4]
    values = [torch.tensor([float(s**2 + 3 * s)]) for s in steps]
    history = list(zip(steps, values, strict=True))
    assert forecast(history, 6, 2).item() == pytest.approx(6**2 + 3 * 6)
    assert forecast(history, 6, 1).item() == pytest.approx(28 + (28 - 10) * 2 / 2)
    assert forecast(history, 6, 0).item() == 28.0  # plain reuse
    assert sum(lagrange_weights(steps, 9)) == pytest.approx(1.0)
    nested = [(s, (v, (v * 2,))) for s, v in history]
    out = forecast(nested, 6, 2)
    assert out[1][0].item() == pytest.approx(2 * (6**2 + 3 * 6))  # through a block's tuples
    errors = ForecastErrors()
    line = [(s, torch.tensor([2.0 * s + 1])) for s in (0, 1, 2)]
    errors.record("up_blocks.1", line, 5, torch.tensor([11.0]))
    orders = errors.best_orders(["up_blocks.1", "up_blocks.2"], default=1)
    assert orders == {"up_blocks.1": 1, "up_blocks.2": 1}  # a line: order 1 exact, 2 ties
    errors.record("up_blocks.2", line, 4, torch.tensor([5.0]))  # stayed put: reuse wins
    errors.record("up_blocks.2", line, 3, torch.tensor([0.0]))  # not a forecast gap: ignored
    assert errors.best_orders(["up_blocks.2"], default=1) == {"up_blocks.2": 0}


def test_cfg_steps_and_probe_margin_are_planned_from_measurements():
    change = {1: 0.5, 2: 0.3, 3: 0.05, 4: 0.05, 5: 0.05, 6: 0.2, 7: 0.01}
    assert plan_cfg_steps(change, 8, 0.12, warmup_steps=2) == (3, 4, 7)  # 5: 0.15 > 0.12
    assert plan_cfg_steps(change, 8, 0.005, warmup_steps=2) == ()
    assert plan_cfg_steps({}, 8, 1.0, warmup_steps=2) == ()  # nothing measured: both halves
    seeds = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.1, 0.1, 0.1, 0.3]])
    expected, margin = calibrate_probe(seeds, frozenset({0, 1}), slack=0.0)
    assert expected == pytest.approx((0.15, 0.15, 0.15, 0.25))
    assert margin == pytest.approx(0.6 / 0.45)  # seed 0 over steps 2-3 (0.4 / 0.3) is less
    assert calibrate_probe(seeds, frozenset({0, 1}), slack=0.5)[1] == pytest.approx(2.0)


def test_bad_switch_values_are_refused_in_one_line():
    for name in ("forecast", "cfg_reuse", "probe"):
        with pytest.raises(InvalidInputError, match=f"^{name} must be true or false") as err:
            BlockCachingConfig(**{name: "yes"})
        assert "\n" not in str(err.value)
    config = BlockCachingConfig(forecast=False, cfg_reuse=False, probe=False)
    assert (config.forecast, config.cfg_reuse, config.probe) == (False, False, False)


def test_every_part_changes_the_images_and_removal_restores_the_unet(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    full = _images(tiny_pipe, unet)
    plain = _schedule(unet)
    orders = {name: 1 for name in denoiser_blocks(unet) if name.startswith("up_blocks")}
    probe = (tuple([1e-6] * 5), 1.0)  # any movement is a drift: the probe always fires
    variants = {
        "plain": plain,
        "forecast": replace(plain, forecast_orders=orders),
        "cfg": replace(plain, cfg_steps=(3, 4)),
        "probe": replace(plain, probe_change=probe[0], probe_margin=probe[1]),
    }
    images = {}
    for name, schedule in variants.items():
        state = apply_block_caching(unet, schedule)
        images[name] = _images(tiny_pipe, unet)
        assert torch.equal(images[name], _images(tiny_pipe, unet)), name  # reset per generation
        if name == "probe":
            assert state.probe_fired == [3, 4, 3, 4]  # every skipped step, both generations
    assert not torch.allclose(images["plain"], full, atol=1e-3)  # blocks really skipped
    for name in ("forecast", "cfg"):
        assert not torch.allclose(images[name], images["plain"], atol=1e-4), name
    assert torch.allclose(images["probe"], full, atol=1e-5)  # forced back to the full model
    layers = {name: routing_layer(s, [], BlockCachingConfig()) for name, s in variants.items()}
    dumps = {name: layer.model_dump_json() for name, layer in layers.items()}
    assert len(set(dumps.values())) == len(dumps)  # each part is recorded
    for name, schedule in variants.items():
        manifest = FragmentManifest.model_construct(dynamic_routing=layers[name])
        assert caching_schedule(manifest) == replace(schedule, block_time_ms={}), name
    remove_block_caching(unet)
    assert torch.equal(_images(tiny_pipe, unet), full)
    assert not any(m._diffusers_hook.hooks for m in unet.modules() if hasattr(m, "_diffusers_hook"))
    for name, original in tiny_pipe.unet.state_dict().items():
        assert torch.equal(unet.state_dict()[name], original), name


def test_the_probe_forces_a_recompute_only_on_a_drifting_input(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    calls = []
    unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    calm = _schedule(unet, probe_change=(100.0,) * 5, probe_margin=1.25)
    state = apply_block_caching(unet, calm)  # the profile moved far more than this input
    _images(tiny_pipe, unet)
    assert state.probe_fired == [] and len(calls) == 4  # the mid block at 0, 1, 2, 5 only
    drifting = replace(calm, probe_change=(1e-4,) * 5)  # this input moves 1000x the profile
    state = apply_block_caching(unet, drifting)
    calls.clear()
    _images(tiny_pipe, unet)
    assert state.probe_fired == [3, 4] and len(calls) == 6  # forced at both skipped steps
    assert routed_cost(drifting) == routed_cost(replace(drifting, probe_change=()))  # runs anyway
    remove_block_caching(unet)


def test_manifests_written_before_load_and_serialise_unchanged():
    for folder in sorted(RESULTS.iterdir())[:3]:
        raw = json.loads((folder / "fragment_manifest.json").read_text())
        manifest = FragmentManifest.from_bytes(json.dumps(raw).encode())
        assert json.loads(manifest.to_json())["dynamic_routing"] == raw["dynamic_routing"]
        schedule = caching_schedule(manifest)
        assert schedule is not None and schedule.forecast_orders == {}
        assert (schedule.cfg_steps, schedule.probe_change, schedule.probe_margin) == ((), (), None)
    assert schedule.probe_block() == "down_blocks.0"  # the UNet runs its first down block first


def test_switches_off_keep_the_key_params_of_before():
    from dataclasses import asdict

    off = BlockCachingConfig()
    assert (off.forecast, off.cfg_reuse, off.probe) == (False, False, False)
    before = {k: v for k, v in asdict(off).items() if k not in (*SWITCHES, "floor")}
    assert off.params() == before  # nor does an empty floor (the gate ladder's) change it
    on = BlockCachingConfig(forecast=True, probe=True)
    assert on.params()["forecast"] is True and "cfg_reuse" not in on.params()
    floored = BlockCachingConfig(floor={"mid_block": [0, 3]})
    assert floored.params()["floor"] == (("mid_block", (0, 3)),)


SWITCHES = ("forecast", "cfg_reuse", "probe")
