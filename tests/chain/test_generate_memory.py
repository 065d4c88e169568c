"""The chain's generate step under a memory budget: batch sizes, the out-of-memory ladder and
the job row's metrics, on tiny-sd on the CPU."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from fragjobs import chain
from fragjobs.chain.bases import base
from fragjobs.chain.fragments import warm_fragment_unet
from fragjobs.chain.validate_step import generation_config
from fragjobs.errors import ConfigError, NotFoundError
from fragjobs.generation import generate_images
from fragjobs.generation.budget import BUDGET_VARIABLE
from fragjobs.generation.oom_ladder import (
    FULL_MODEL_ON_CPU,
    GIVE_UP,
    HALVE_BATCH,
    SLICING_TILING,
)

PROMPT = "a dog on a jet ski"  # no fragment: the full model, the chain's base, runs


@pytest.fixture
def warm_unet(ws):
    """The UNet of the warm tiny-sd base the chain generates with (hooks removed after)."""
    handles = []
    yield base("tiny-sd", ws.settings).pipe.unet, handles
    for handle in handles:
        handle.remove()


def _fail_first(unet, handles, times=None):
    calls = {"n": 0}

    def hook(module, args):
        if times is None or calls["n"] < times:
            calls["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    handles.append(unet.register_forward_pre_hook(hook))


def test_job_row_records_the_memory_metrics(ws):
    result = chain.generate(PROMPT, seeds=[0, 1], model="tiny-sd", steps=2, batch_size=2, ws=ws)
    job = ws.catalog.get_job(result.job_id)
    assert job.status == "done" and job.metrics == result.metrics
    metrics = job.metrics
    assert metrics["device"] == "cpu" and metrics["budget_bytes"] > 0
    assert metrics["batch_size_requested"] == 2 and sum(metrics["batch_sizes"]) == 2
    assert metrics["per_sample_bytes"] > 0 and metrics["oom_events"] == []


def test_small_budget_runs_one_image_at_a_time_with_every_image(ws, monkeypatch):
    monkeypatch.setattr(ws.settings, "memory_budget_mb", 0.01)
    result = chain.generate(PROMPT, seeds=[4, 2], model="tiny-sd", steps=2, batch_size=2, ws=ws)
    metrics = ws.catalog.get_job(result.job_id).metrics
    assert metrics["budget_source"] == BUDGET_VARIABLE and metrics["over_budget"]
    assert metrics["batch_size_chosen"] == 1 and metrics["budget_steps"]
    assert len(result.image_uris) == 2 and len(ws.catalog.list_images(result.job_id)) == 2
    # On the CPU the full model on the CPU would not have helped: not taken.
    assert metrics["full_model_on_cpu_from_seed"] is None
    assert "out of memory" not in result.fallback_reason


def test_bad_budget_is_refused_before_any_row(ws, monkeypatch):
    monkeypatch.setattr(ws.settings, "memory_budget_mb", float("inf"))
    with pytest.raises(ConfigError, match=BUDGET_VARIABLE):
        chain.generate(PROMPT, seeds=[0], model="tiny-sd", steps=2, job_id="job-budget", ws=ws)
    with pytest.raises(NotFoundError):
        ws.catalog.get_job("job-budget")


def test_oom_in_the_chain_halves_then_slices_and_keeps_every_image(ws, warm_unet):
    unet, handles = warm_unet
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    _fail_first(unet, handles, times=2)
    result = chain.generate(PROMPT, seeds=[0, 1], model="tiny-sd", steps=2, batch_size=2, ws=ws)
    metrics = ws.catalog.get_job(result.job_id).metrics
    assert [e["action"] for e in metrics["oom_events"]] == [HALVE_BATCH, SLICING_TILING]
    assert metrics["batch_sizes"] == [1, 1]
    assert [image.seed for image in ws.catalog.list_images(result.job_id)] == [0, 1]
    # The warm base serves later jobs: its attention processors are back as they were.
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


def test_oom_on_every_rung_fails_the_job_with_its_steps_recorded(ws, warm_unet):
    unet, handles = warm_unet
    _fail_first(unet, handles)
    with pytest.raises(torch.OutOfMemoryError):
        chain.generate(PROMPT, seeds=[0], model="tiny-sd", steps=2, job_id="job-oom", ws=ws)
    job = ws.catalog.get_job("job-oom")
    assert job.status == "failed"
    events = job.metrics["oom_events"]
    assert [e["action"] for e in events] == [SLICING_TILING, GIVE_UP]
    reasons = {s["action"]: s["reason"] for s in events[-1]["skipped"]}
    assert "CPU" in reasons["model_cpu_offload"]
    assert "already runs the full model on the CPU" in reasons["full_model_on_cpu"]

    # Delivered again once memory is back: done, and the first delivery's steps are kept.
    for handle in handles:
        handle.remove()
    handles.clear()
    chain.generate(PROMPT, seeds=[0], model="tiny-sd", steps=2, job_id="job-oom", ws=ws)
    job = ws.catalog.get_job("job-oom")
    assert job.status == "done" and job.metrics["oom_events"] == []
    assert [e["action"] for e in job.metrics["earlier_oom_events"]] == [SLICING_TILING, GIVE_UP]


@pytest.fixture
def fragment_ws(tmp_path, ready_fragment_template, monkeypatch):
    """A workspace holding a copy of the ready tiny-sd fragment; its warm UNet is this test's."""
    settings = ready_fragment_template.copy_to(tmp_path / "fragment-data")
    monkeypatch.setattr(chain.STATE, "fragment_unets", OrderedDict())
    workspace = chain.Workspace.open(settings)
    yield workspace
    workspace.close()


def test_persistent_oom_on_the_fragment_ends_on_the_full_model_on_cpu(
    fragment_ws, ready_fragment_template
):
    ws, key, prompt = fragment_ws, ready_fragment_template.key, ready_fragment_template.prompt
    loaded = base("tiny-sd", ws.settings)
    manifest, unet = warm_fragment_unet(ws, loaded, ws.catalog.get_fragment(key))
    handles = []
    _fail_first(unet, handles)
    try:
        result = chain.generate(prompt, seeds=[0, 1], model="tiny-sd", key=key, batch_size=2, ws=ws)
    finally:
        for handle in handles:
            handle.remove()
    job = ws.catalog.get_job(result.job_id)
    events = job.metrics["oom_events"]
    assert [e["action"] for e in events] == [HALVE_BATCH, SLICING_TILING, FULL_MODEL_ON_CPU]
    assert job.metrics["full_model_on_cpu_from_seed"] == 0
    assert job.status == "done" and job.used_fallback and result.used_fallback
    assert "full model on the CPU" in job.fallback_reason
    assert [image.seed for image in ws.catalog.list_images(result.job_id)] == [0, 1]
    full = generate_images(loaded.pipe, prompt, [0, 1], generation_config(manifest, 2))
    assert torch.allclose(result.images, full, atol=1e-4)
