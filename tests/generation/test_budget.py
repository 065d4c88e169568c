"""The memory budget and the out-of-memory ladder on tiny-sd, on the CPU.

The allocation failures are real: a forward pre-hook on the UNet raises a real
``torch.OutOfMemoryError``, or asks the CPU allocator for 4 EiB (its own "can't allocate
memory" error), when told to.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fragjobs.config import get_settings
from fragjobs.errors import ConfigError
from fragjobs.generation import (
    BudgetedGeneration,
    GenerationConfig,
    MemoryBudget,
    check_budget_mb,
    choose_batch_size,
    estimate_per_sample_bytes,
    generate_images,
    generate_within_budget,
    is_out_of_memory,
    with_unet,
)
from fragjobs.generation.budget import BUDGET_VARIABLE, MIB, device_weight_bytes
from fragjobs.generation.oom_ladder import (
    FULL_MODEL_ON_CPU,
    GIVE_UP,
    HALVE_BATCH,
    MODEL_CPU_OFFLOAD,
    SLICING_TILING,
)

PROMPT = "a red circle"
CONFIG = GenerationConfig(steps=2, guidance_scale=7.5, height=32, width=32, batch_size=4)
SEEDS = [3, 1, 4, 5]


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    """The images of SEEDS without any budget or failure."""
    return generate_images(tiny_pipe, PROMPT, SEEDS, CONFIG)


@pytest.fixture
def fragment_pipe(tiny_pipe):
    """A pipeline of its own UNet (a copy of tiny-sd's), for hooks that must not leak."""
    return with_unet(tiny_pipe, copy.deepcopy(tiny_pipe.unet))


def _processor_types(pipe):
    return {name: type(p) for name, p in pipe.unet.attn_processors.items()}


def _fail(unet, *, times=None, above_batch=None, error="oom"):
    """A real forward pre-hook failing the first ``times`` UNet calls, or every call whose
    batch (images × 2 with guidance) is above ``above_batch``."""
    calls = {"failed": 0}

    def hook(module, args):
        failing = (times is None or calls["failed"] < times) and (
            above_batch is None or args[0].shape[0] > above_batch
        )
        if not failing:
            return
        calls["failed"] += 1
        if error == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's own failure

    return unet.register_forward_pre_hook(hook)


# -- the budget ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_bad_budget_in_the_environment_is_one_config_error(settings, monkeypatch, value):
    monkeypatch.setenv(BUDGET_VARIABLE, value)
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match=BUDGET_VARIABLE) as info:
        get_settings()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "abc", True])
def test_bad_budget_value_is_refused_before_anything_changes(tiny_pipe, value):
    before = _processor_types(tiny_pipe)
    with pytest.raises(ConfigError, match=BUDGET_VARIABLE) as info:
        BudgetedGeneration(tiny_pipe, CONFIG, value)
    assert "\n" not in str(info.value)
    assert _processor_types(tiny_pipe) == before
    with pytest.raises(ConfigError, match="positive number"):
        check_budget_mb(value)


def test_budget_from_the_setting_or_free_memory(tiny_pipe):
    set_budget = MemoryBudget.for_pipe(tiny_pipe, 512)
    assert set_budget.budget_bytes == 512 * MIB and set_budget.source == BUDGET_VARIABLE
    auto = MemoryBudget.for_pipe(tiny_pipe, None)
    weights = device_weight_bytes(tiny_pipe, torch.device("cpu"))
    assert weights > 0 and auto.free_bytes > 0
    assert auto.budget_bytes == int(auto.free_bytes * 0.8) + weights
    assert auto.device == torch.device("cpu")


def test_batch_size_fits_the_budget_under_the_ceiling():
    budget = MemoryBudget(torch.device("cpu"), 1000, "test")
    assert choose_batch_size(budget, 100, 200, 8) == 4
    assert choose_batch_size(budget, 100, 200, 3) == 3
    assert choose_batch_size(budget, 900, 200, 8) == 0


def test_estimate_grows_with_the_image_and_shrinks_with_slicing_and_tiling(tiny_pipe):
    small = estimate_per_sample_bytes(tiny_pipe, CONFIG)
    large = estimate_per_sample_bytes(
        tiny_pipe, GenerationConfig(steps=2, guidance_scale=7.5, height=128, width=128)
    )
    assert 0 < small < large
    assert (
        estimate_per_sample_bytes(
            tiny_pipe,
            GenerationConfig(steps=2, guidance_scale=7.5, height=128, width=128),
            sliced=True,
            tiled=True,
        )
        < large
    )


def test_is_out_of_memory_knows_the_allocators_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        assert is_out_of_memory(exc)
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


# -- batch size chosen to fit -------------------------------------------------------------------


def test_small_budget_chooses_a_smaller_batch_and_records_it(tiny_pipe, reference):
    per_sample = estimate_per_sample_bytes(tiny_pipe, CONFIG)
    weights = device_weight_bytes(tiny_pipe, torch.device("cpu"))
    budget_mb = (weights + 2.5 * per_sample) / MIB
    images, metrics = generate_within_budget(tiny_pipe, PROMPT, SEEDS, CONFIG, budget_mb)
    assert metrics["budget_source"] == BUDGET_VARIABLE
    assert metrics["budget_bytes"] == int(budget_mb * MIB)
    assert metrics["per_sample_estimated_bytes"] == per_sample
    assert metrics["batch_size_requested"] == 4 and metrics["batch_size_chosen"] == 2
    assert metrics["batch_sizes"][0] == 2 and sum(metrics["batch_sizes"]) == len(SEEDS)
    assert metrics["per_sample_source"] == "measured" and metrics["per_sample_bytes"] > 0
    assert metrics["oom_events"] == [] and metrics["budget_steps"] == []
    assert torch.allclose(images, reference, atol=1e-4)


def test_explicit_batch_size_is_the_ceiling(tiny_pipe, reference):
    config = GenerationConfig(steps=2, guidance_scale=7.5, height=32, width=32, batch_size=3)
    images, metrics = generate_within_budget(tiny_pipe, PROMPT, SEEDS, config, None)
    assert metrics["batch_size_chosen"] == 3 and max(metrics["batch_sizes"]) <= 3
    assert torch.allclose(images, reference, atol=1e-4)


def test_budget_below_one_image_goes_down_the_ladder_before_running(fragment_pipe, reference):
    before = _processor_types(fragment_pipe)
    images, metrics = generate_within_budget(fragment_pipe, PROMPT, SEEDS, CONFIG, 0.001)
    first, last = metrics["budget_steps"]
    assert first["action"] == SLICING_TILING and first["at_seed"] == SEEDS[0]
    assert first["estimated_need_bytes"] > first["budget_bytes"]
    assert last["action"] == "run_over_budget"
    assert [s["action"] for s in last["skipped"]] == [MODEL_CPU_OFFLOAD, FULL_MODEL_ON_CPU]
    assert "CPU" in last["skipped"][0]["reason"]
    assert metrics["over_budget"] and metrics["batch_size_chosen"] == 1
    assert metrics["attention_slicing"] and metrics["vae_tiling"]
    assert len(images) == len(SEEDS)
    assert torch.allclose(images, reference, atol=1e-4)
    # The pipeline is shared with later jobs: what the ladder changed is undone.
    assert _processor_types(fragment_pipe) == before
    assert not fragment_pipe.vae.use_tiling


# -- out of memory while running ----------------------------------------------------------------


def test_oom_halves_the_batch_then_slices_and_loses_no_image(fragment_pipe, reference):
    handle = _fail(fragment_pipe.unet, times=3)
    delivered = []
    try:
        run = BudgetedGeneration(fragment_pipe, CONFIG, None)
        images = run.run(PROMPT, SEEDS, on_batch=lambda seeds, out: delivered.extend(seeds))
    finally:
        handle.remove()
    metrics = run.metrics
    events = metrics["oom_events"]
    assert [e["action"] for e in events] == [HALVE_BATCH, HALVE_BATCH, SLICING_TILING]
    assert [e["batch_size"] for e in events] == [4, 2, 1]
    assert all(e["at_seed"] == SEEDS[0] and "OutOfMemoryError" in e["error"] for e in events)
    assert metrics["attention_slicing"] and metrics["vae_tiling"]
    assert metrics["batch_sizes"] == [1, 1, 1, 1] and metrics["batch_size_used"] == 1
    assert delivered == SEEDS
    assert torch.allclose(images, reference, atol=1e-4)


def test_real_cpu_allocation_failure_above_a_batch_halves_until_it_fits(fragment_pipe, reference):
    handle = _fail(fragment_pipe.unet, above_batch=4, error="allocator")  # 2 images × guidance
    try:
        images, metrics = generate_within_budget(fragment_pipe, PROMPT, SEEDS, CONFIG, None)
    finally:
        handle.remove()
    (event,) = metrics["oom_events"]
    assert event["action"] == HALVE_BATCH and event["batch_size_after"] == 2
    assert "DefaultCPUAllocator" in event["error"]
    assert metrics["batch_sizes"] == [2, 2] and not metrics["attention_slicing"]
    assert torch.allclose(images, reference, atol=1e-4)


def test_persistent_oom_ends_on_the_full_model_on_cpu(tiny_pipe, fragment_pipe, reference):
    handle = _fail(fragment_pipe.unet)
    config = GenerationConfig(steps=2, guidance_scale=7.5, height=32, width=32, batch_size=2)
    try:
        images, metrics = generate_within_budget(
            fragment_pipe, PROMPT, SEEDS, config, None, cpu_fallback=lambda: tiny_pipe
        )
    finally:
        handle.remove()
    events = metrics["oom_events"]
    assert [e["action"] for e in events] == [HALVE_BATCH, SLICING_TILING, FULL_MODEL_ON_CPU]
    assert [s["action"] for s in events[-1]["skipped"]] == [MODEL_CPU_OFFLOAD]
    assert metrics["full_model_on_cpu_from_seed"] == SEEDS[0]
    assert len(images) == len(SEEDS)
    assert torch.allclose(images, reference, atol=1e-4)  # the fallback's own images


def test_oom_on_the_last_rung_is_raised_with_every_step_recorded(fragment_pipe):
    handle = _fail(fragment_pipe.unet)
    before = _processor_types(fragment_pipe)
    config = GenerationConfig(steps=2, guidance_scale=7.5, height=32, width=32, batch_size=1)
    run = BudgetedGeneration(fragment_pipe, config, None)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            run.run(PROMPT, SEEDS)
    finally:
        handle.remove()
    events = run.metrics["oom_events"]
    assert [e["action"] for e in events] == [SLICING_TILING, GIVE_UP]
    assert [s["action"] for s in events[-1]["skipped"]] == [MODEL_CPU_OFFLOAD, FULL_MODEL_ON_CPU]
    assert run.metrics["batch_sizes"] == []
    assert _processor_types(fragment_pipe) == before


def test_other_errors_are_not_taken_for_out_of_memory(fragment_pipe):
    def hook(module, args):
        raise ValueError("a broken UNet")

    handle = fragment_pipe.unet.register_forward_pre_hook(hook)
    run = BudgetedGeneration(fragment_pipe, CONFIG, None)
    try:
        with pytest.raises(ValueError, match="a broken UNet"):
            run.run(PROMPT, SEEDS)
    finally:
        handle.remove()
    assert run.metrics["oom_events"] == []
