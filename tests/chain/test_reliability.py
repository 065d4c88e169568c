"""Nothing lost, nothing half-written: concurrent writers converge, repairs work, bad input is
refused before any work (issue: farm drills, every bad input)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from fragjobs import chain
from fragjobs.errors import (
    ConfigError,
    InvalidInputError,
    NotFoundError,
    PoisonTaskError,
)
from fragjobs.keys import FRAGMENT_FILE, fragment_object

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle"


def _name(key: str, filename: str) -> str:
    return fragment_object(key.split("_", 1)[0], key, filename)


# -- concurrent writers ----------------------------------------------------------------------


def test_four_concurrent_profiles_of_one_prompt_converge(settings):
    """Four processes profile one new prompt at once: one row, its sha256 the stored object's."""
    code = textwrap.dedent(
        """
        import json, sys
        from fragjobs import chain
        result = chain.profile("a green star", model="tiny-sd", seeds=[0], steps=2,
                               progress=False)
        print(json.dumps({"id": result.profile_id, "reused": result.reused}))
        """
    )
    env = {**os.environ, "FRAGJOBS_DATA_DIR": str(settings.data_dir)}
    chain.Workspace.open(settings).close()  # the catalog exists before the race
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = [json.loads(run.communicate(timeout=600)[0].strip().splitlines()[-1]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert len({o["id"] for o in outputs}) == 1
    assert sorted(o["reused"] for o in outputs) == [False, True, True, True]  # profiled once
    ws = chain.Workspace.open(settings)
    try:
        row = ws.catalog.get_profile(outputs[0]["id"])
        stored = ws.store.get_bytes(f"profiles/{row.profile_id}/stats.safetensors")
        from fragjobs.keys import sha256_hex

        assert sha256_hex(stored) == row.stats_sha256
        again = chain.profile("a green star", model="tiny-sd", seeds=[0], steps=2, ws=ws)
        assert again.reused
    finally:
        ws.close()


def test_a_profile_whose_object_is_gone_is_profiled_again(ws):
    first = chain.profile(PROMPT, model="tiny-sd", seeds=[0], steps=2, ws=ws, progress=False)
    ws.store.delete(f"profiles/{first.profile_id}/stats.safetensors")
    again = chain.profile(PROMPT, model="tiny-sd", seeds=[0], steps=2, ws=ws, progress=False)
    assert not again.reused
    row = ws.catalog.get_profile(first.profile_id)
    assert (
        ws.store.stat(f"profiles/{first.profile_id}/stats.safetensors").sha256 == row.stats_sha256
    )


# -- repair ------------------------------------------------------------------------------------


@pytest.fixture
def ready_ws(ready_fragment_template, tmp_path):
    workspace = chain.Workspace.open(ready_fragment_template.copy_to(tmp_path / "data"))
    chain.reset_process_state()
    yield workspace
    workspace.close()


def test_rm_keeps_a_tombstone_and_extract_rebuilds_it(ready_ws, ready_fragment_template):
    ws, key = ready_ws, ready_fragment_template.key
    row = ws.catalog.get_fragment(key)
    chain.remove_fragment(ws, key)
    after = ws.catalog.get_fragment(key)
    assert after.status == "evicted" and after.file_sha256 is None
    assert ws.store.list(_name(key, "")) == []
    assert ws.catalog.lineage(key)["profile_id"] == row.profile_id  # lineage kept
    generated = chain.generate(PROMPT, seeds=[7], model="tiny-sd", ws=ws, progress=False)
    assert generated.used_fallback  # never the removed fragment

    rebuilt = chain.extract(row.profile_id, ws=ws, model="tiny-sd")
    assert rebuilt.key == key and not rebuilt.reused
    assert ws.catalog.get_fragment(key).status == "building"
    assert chain.validate(key, seeds=[1000, 1001], ws=ws, progress=False).passed


def test_extract_rebuilds_a_corrupt_fragment_in_place(ready_ws, ready_fragment_template):
    ws, key = ready_ws, ready_fragment_template.key
    profile_id = ws.catalog.get_fragment(key).profile_id
    ws.store.put_bytes(_name(key, FRAGMENT_FILE), b"flipped")
    result = chain.extract(profile_id, ws=ws, model="tiny-sd")
    assert result.key == key and not result.reused
    row = ws.catalog.get_fragment(key)
    assert row.status == "building"
    assert ws.store.stat(_name(key, FRAGMENT_FILE)).sha256 == row.file_sha256
    assert len(ws.catalog.lineage(key)["validation_ids"]) == 1  # the row (and lineage) stayed


def test_gc_removes_what_a_dead_run_left_building(ready_ws, ready_fragment_template):
    ws = ready_ws
    row = ws.catalog.get_fragment(ready_fragment_template.key)
    ws.catalog.create_fragment(
        "tiny-sd_0000000000000000_deadbeef", row.profile_id, row.base_model_id, PROMPT, {}, "x"
    )
    ws.store.put_bytes("fragments/tiny-sd/tiny-sd_1111111111111111_00000000/manifest.json", b"{}")
    report = chain.collect_garbage(ws, stale_s=0)
    assert report.stale_fragments == ["tiny-sd_0000000000000000_deadbeef"]
    assert report.orphan_folders == ["fragments/tiny-sd/tiny-sd_1111111111111111_00000000"]
    assert [f.key for f in ws.catalog.list_fragments()] == [ready_fragment_template.key]


def test_a_lost_catalog_is_refused_then_rebuilt_from_the_manifests(
    ready_fragment_template, tmp_path
):
    settings = ready_fragment_template.copy_to(tmp_path / "data")
    (settings.data_dir / "catalog.db").unlink()
    with pytest.raises(ConfigError, match="fragjobs db rebuild"):
        chain.Workspace.open(settings)
    assert not (settings.data_dir / "catalog.db").exists()  # nothing recreated empty

    ws = chain.Workspace.open(settings, allow_missing_catalog=True)
    try:
        report = chain.rebuild_catalog(ws)
        assert report.fragments == [ready_fragment_template.key] and report.skipped == {}
        row = ws.catalog.get_fragment(ready_fragment_template.key)
        assert row.status == "ready"
        chain.load_stored_fragment(row.key, ws)  # hashes match the stored objects
    finally:
        ws.close()


# -- the poison guard on every task ----------------------------------------------------------


def test_a_task_delivered_too_often_fails_with_the_reason(ws):
    for _ in range(3):
        chain.guard_task_delivery(ws, "task-1", "fragjobs.profile", limit=3)
    with pytest.raises(PoisonTaskError, match="delivered 4 times"):
        chain.guard_task_delivery(ws, "task-1", "fragjobs.profile", limit=3)
    chain.guard_task_delivery(ws, "task-2", "fragjobs.profile", limit=3)  # counted apart


# -- bad input, refused before any work ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"guidance_scale": math.nan}, "finite"),
        ({"guidance_scale": math.inf}, "finite"),
        ({"prompt": "a\x00b"}, "control character"),
        ({"prompt": "\udcff"}, "lone surrogate"),
        ({"prompt": "x" * 5000}, "limit is 2000"),
        ({"seeds": {1: 2}}, "list of integers"),
    ],
)
def test_generate_refuses_bad_arguments_and_writes_nothing(ws, kwargs, match):
    args = {"prompt": PROMPT, "seeds": [0], "model": "tiny-sd", "ws": ws, "progress": False}
    with pytest.raises(InvalidInputError, match=match):
        chain.generate(**{**args, **kwargs})
    assert ws.store.list("") == []


def test_a_job_id_is_bound_to_its_prompt_and_seeds(ready_ws):
    ws = ready_ws
    chain.generate(PROMPT, seeds=[1], model="tiny-sd", job_id="job-x", ws=ws, progress=False)
    with pytest.raises(InvalidInputError, match="job job-x exists"):
        chain.generate("a blue moon", seeds=[1], model="tiny-sd", job_id="job-x", ws=ws)
    with pytest.raises(NotFoundError, match="no fragment"):
        chain.generate(PROMPT, seeds=[1], model="tiny-sd", key="tiny-sd_00_00", ws=ws)


def test_apply_fragment_refuses_what_is_not_a_pipeline_or_a_key(ready_ws, tiny_pipe):
    with pytest.raises(InvalidInputError, match="pipeline of a supported family"):
        chain.apply_fragment_(None, "tiny-sd_00_00", ws=ready_ws)
    with pytest.raises(InvalidInputError, match="fragment key or a fragment folder"):
        chain.apply_fragment_(tiny_pipe, None, ws=ready_ws)


@pytest.mark.parametrize(
    ("env", "argv", "match"),
    [
        ({"FRAGJOBS_MAX_VARIANTS": "abc"}, ["fragments", "ls"], "FRAGJOBS_MAX_VARIANTS"),
        ({"FRAGJOBS_DEVICE": "banana"}, ["fragments", "ls"], "FRAGJOBS_DEVICE"),
        ({}, ["run", "a\x00b"], "control character"),
        ({}, ["generate", PROMPT, "--key", "tiny-sd_00_00"], "no fragment"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(settings, monkeypatch, env, argv, match):
    from fragjobs.cli import main
    from fragjobs.config import get_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    chain.reset_process_state()
    try:
        result = CliRunner().invoke(main, argv)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]


def test_a_prompt_the_text_encoder_cuts_short_gets_a_note(tiny_pipe):
    from fragjobs.base_text import truncation_note

    assert truncation_note(tiny_pipe, PROMPT) is None
    note = truncation_note(tiny_pipe, "a red circle on the left of a blue square " * 6)
    assert "reads 77" in note and "tokens long" in note


def test_a_malformed_thresholds_file_is_refused_before_any_work(settings, tmp_path, monkeypatch):
    from fragjobs.cli import main
    from fragjobs.config import get_settings

    bad = tmp_path / "gate.yaml"
    bad.write_text("ssim_min: [not, a, number]\n")
    monkeypatch.setenv("FRAGJOBS_THRESHOLDS_PATH", str(bad))
    get_settings.cache_clear()
    chain.reset_process_state()
    try:
        result = CliRunner().invoke(main, ["run", PROMPT, "--model", "tiny-sd"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "error:" in result.output
    ws = chain.Workspace.open(get_settings())
    try:
        assert ws.catalog.list_fragments() == [] and ws.store.list("") == []
    finally:
        ws.close()
